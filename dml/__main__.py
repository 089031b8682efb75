import sys

if len(sys.argv) > 1 and sys.argv[1] in ("embed", "index", "search", "export"):
    from dml.inference.cli import main as use_a_checkpoint

    sys.exit(use_a_checkpoint(sys.argv[1:]))
if len(sys.argv) > 1 and sys.argv[1] == "compare":
    from dml.compare.cli import main as compare

    sys.exit(compare(sys.argv[2:]))

from dml.cli import main  # noqa: E402 - training: LightningCLI's subcommands

main()
