"""Parse a data set without training and print one JSON line with its split sizes.

    python -m dml.data.check DATASET ROOT [--subset small] [--no-verify] [--decode]
    make data-check DATASET=cub DATA_ROOT=/data/cub [DECODE=1]

``--decode`` also opens and decodes every image (in parallel) and lists the unreadable ones:
the check a copied or re-encoded data set needs before a long run.

Exit status 0 and the JSON line, or 1 and the error (what is missing, malformed, incomplete or
unreadable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import List, Optional

from dml.data.image_datamodules import DATAMODULES
from dml.data.image_list import ImageListDataset


def _unreadable_in(args) -> List[str]:
    images, indices = args
    dataset = ImageListDataset(images, transform=None, skip_unreadable=True)
    for i in indices:
        dataset[i]
    return dataset.unreadable_files()


def unreadable_images(splits, workers: Optional[int] = None) -> List[str]:
    """Every image of every split that PIL cannot open and decode."""
    jobs = []
    for images in splits.values():
        n = len(images)
        step = max(1, -(-n // (4 * (workers or os.cpu_count() or 1))))
        jobs += [(images, range(start, min(start + step, n))) for start in range(0, n, step)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return sorted({f for found in pool.map(_unreadable_in, jobs) for f in found})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dml.data.check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", choices=sorted(DATAMODULES))
    parser.add_argument("root", help="the folder the official archive unpacked into")
    parser.add_argument("--subset", default=None, help="omniglot only: full (default) or small")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="do not check the published split sizes and the image files",
    )
    parser.add_argument(
        "--decode", action="store_true", help="decode every image and list the unreadable ones"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes for --decode (default: the CPU count)"
    )
    args = parser.parse_args(argv)
    kwargs = {"root": args.root, "verify": not args.no_verify}
    if args.subset is not None:
        if args.dataset != "omniglot":
            parser.error("--subset applies to omniglot only")
        kwargs["subset"] = args.subset
    try:
        dm = DATAMODULES[args.dataset](**kwargs)
        sizes = dm.split_sizes()
        if args.decode:
            bad = unreadable_images(dm.splits, args.workers)
            sizes["decoded"] = sum(len(images) for images in dm.splits.values())
            sizes["unreadable"] = len(bad)
            if bad:
                more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
                print(
                    f"error: {len(bad)} unreadable image(s): {', '.join(bad[:20])}{more}",
                    file=sys.stderr,
                )
                print(json.dumps(sizes))
                return 1
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
