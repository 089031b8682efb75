import sys

if len(sys.argv) > 1 and sys.argv[1] in ("embed", "index", "search", "export"):
    from dml.inference.cli import main as use_a_checkpoint

    sys.exit(use_a_checkpoint(sys.argv[1:]))
if len(sys.argv) > 1 and sys.argv[1] == "compare":
    from dml.compare.cli import main as compare

    sys.exit(compare(sys.argv[2:]))

if sys.argv[1:] in ([], ["-h"], ["--help"]):
    from dml.short_help import top_help

    print(top_help())
    sys.exit(0 if sys.argv[1:] else 2)
if (
    sys.argv[1:2]
    and sys.argv[1] in ("fit", "validate", "test")
    and {"-h", "--help"} & set(sys.argv)
):
    from dml.short_help import short_help  # without loading Lightning

    print(short_help(sys.argv[1]))
    sys.exit(0)

from dml.cli import main  # noqa: E402 - training: LightningCLI's subcommands

main()
