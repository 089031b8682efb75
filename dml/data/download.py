"""Download and verify (MD5) the data sets that have a public download; print where to get the
others.

    python -m dml.data.download DATASET [ROOT]      (make data DATASET=cub)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Tuple

from dml.data.image_datamodules import DATAMODULES

# dataset -> [(url, archive file name, md5)]
DOWNLOADS: Dict[str, List[Tuple[str, str, str]]] = {
    "cub": [
        (
            "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
            "CUB_200_2011.tgz",
            "97eceeb196236b17998738112f37df78",
        )
    ],
    "sop": [
        (
            "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
            "Stanford_Online_Products.zip",
            "7f73d41a2f44250d4779881525aea32e",
        )
    ],
    "omniglot": [
        (
            "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
            "images_background.zip",
            "images_background.zip",
            "68d2efa1b9178cc56df9314c21c6e718",
        ),
        (
            "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
            "images_evaluation.zip",
            "images_evaluation.zip",
            "6b91aef0f799c5bb55b94e3f2daec811",
        ),
        # The two small background subsets (data.init_args.subset: small); MD5 of the
        # published files.
        (
            "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
            "images_background_small1.zip",
            "images_background_small1.zip",
            "e704a628b5459e08445c13499850abc4",
        ),
        (
            "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
            "images_background_small2.zip",
            "images_background_small2.zip",
            "b75a71a51d3b13f821f212756fe481fd",
        ),
    ],
}


def _md5(path: str) -> str:
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(dataset: str, root: str) -> None:
    from torchvision.datasets.utils import check_integrity, download_url, extract_archive

    os.makedirs(root, exist_ok=True)
    for url, filename, md5 in DOWNLOADS[dataset]:
        path = os.path.join(root, filename)
        if os.path.isfile(path) and not check_integrity(path, md5):
            print(
                f"{path}: its MD5 is {_md5(path)}, not {md5}: downloading it again", file=sys.stderr
            )
        if not check_integrity(path, md5):
            download_url(url, root, filename, md5)  # raises if the checksum differs
        print(f"{path}: MD5 {md5} verified")
        if dataset != "omniglot":  # Omniglot is read from its zip archives directly
            extract_archive(path, root)
            print(f"unpacked into {root}")


def manual_route(dataset: str, root: str) -> str:
    """What to fetch by hand, where to put it and its checksum; `make data` then verifies and
    unpacks a file already in place instead of downloading it."""
    lines = [f"To get {dataset} by hand (another machine, a browser, a mirror):"]
    for url, filename, md5 in DOWNLOADS[dataset]:
        lines.append(f"  {url}\n    -> {os.path.join(root, filename)} (MD5 {md5})")
    lines.append(
        f"then run `make data DATASET={dataset} DATA_ROOT={root}` again: it checks the "
        f"MD5 and unpacks (docs/data.md)."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dml.data.download", description=__doc__)
    parser.add_argument("dataset", choices=sorted(DATAMODULES))
    parser.add_argument("root", nargs="?", default=None, help="default: data/<dataset>")
    args = parser.parse_args(argv)
    root = args.root or os.path.join("data", args.dataset)
    if args.dataset not in DOWNLOADS:
        print(
            f"{args.dataset} has no public download. {DATAMODULES[args.dataset].guidance} "
            f"Put it in {root} (or pass --data.init_args.root)."
        )
        return 2
    try:
        download(args.dataset, root)
    except Exception as error:  # network down, checksum mismatch, bad archive
        print(f"error: downloading {args.dataset} failed: {error}", file=sys.stderr)
        print(manual_route(args.dataset, root), file=sys.stderr)
        return 1
    print(f"done: make train DATASET={args.dataset} ARGS='--data.init_args.root {root}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
