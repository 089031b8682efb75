"""Wheels for a GPU node without internet whose image already holds torch (a cluster's compute
node, a lent benchmark machine): the packages ``dml`` needs at run time that the node lacks.

    # on the node: python3 -m pip list --format=freeze > node.txt   (bring node.txt here)
    python benchmarks/offline_wheels.py node.txt --dest .whl [--python-version 3.12]
    # on the node: pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    #              PYTHONPATH=/tmp/site make gpu-bench SYSTEM_PYTHON=1

The requirement closure of ``dml`` (install_requires plus the ``cpu`` extra: faiss-cpu) is read
from this machine's installed metadata (so run it in the project's .venv), minus every package
the node lists, at this machine's versions, downloaded with ``--no-deps`` for the node's Python
and manylinux x86-64. ``--skip faiss-cpu`` leaves faiss out (about 18 MB): the evaluation's exact rank pass does not
use it, NMI's k-means then runs in scikit-learn, and the k-NN searches in torch.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
from typing import Dict, Iterable

from packaging.requirements import Requirement

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(name: str, extras: Iterable[str] = ()) -> Dict[str, str]:
    """{package: installed version} of ``name`` and everything it requires, recursively."""
    found: Dict[str, str] = {}

    def walk(package: str, wanted: Iterable[str]) -> None:
        key = normal(package)
        if key in found:
            return
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            return
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e})
                                         for e in ("", *wanted)):
                walk(req.name, req.extras)

    walk(name, tuple(extras))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("node_packages", help="the node's `pip list --format=freeze` output")
    parser.add_argument("--dest", default=".whl")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--skip", nargs="*", default=[], help="packages not to download")
    args = parser.parse_args()
    with open(args.node_packages) as f:
        have = {normal(re.split(r"[=<>@ ]", line.strip())[0]) for line in f if line.strip()}
    need = closure("dml", ["cpu"])
    need.pop("dml", None)
    missing = {k: v for k, v in sorted(need.items())
               if k not in have and k not in {normal(s) for s in args.skip}}
    print(f"{len(need)} packages needed, {len(missing)} missing on the node: "
          + ", ".join(f"{k}=={v}" for k, v in missing.items()))
    if not missing:
        return 0
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", args.python_version, "--implementation", "cp",
               "-d", args.dest]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return subprocess.call(command + [f"{k}=={v}" for k, v in missing.items()])


if __name__ == "__main__":
    sys.exit(main())
