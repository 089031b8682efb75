"""Parse a data set without training and print one JSON line with its split sizes.

    python -m dml.data.check DATASET ROOT [--subset small] [--no-verify]
    make data-check DATASET=cub DATA_ROOT=/data/cub

Exit status 0 and the JSON line, or 1 and the error (what is missing, malformed or incomplete).
"""
from __future__ import annotations

import argparse
import json
import sys

from dml.data.image_datamodules import DATAMODULES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dml.data.check", description=__doc__)
    parser.add_argument("dataset", choices=sorted(DATAMODULES))
    parser.add_argument("root", help="the folder the official archive unpacked into")
    parser.add_argument("--subset", default=None, help="omniglot only: full (default) or small")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check the published split sizes and the image files")
    args = parser.parse_args(argv)
    kwargs = {"root": args.root, "verify": not args.no_verify}
    if args.subset is not None:
        if args.dataset != "omniglot":
            parser.error("--subset applies to omniglot only")
        kwargs["subset"] = args.subset
    try:
        sizes = DATAMODULES[args.dataset](**kwargs).split_sizes()
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
