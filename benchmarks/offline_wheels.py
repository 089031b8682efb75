"""Wheels for an offline GPU node whose image already holds torch: what dml needs that it lacks.

    # on the node: python3 -m pip list --format=freeze > node.txt   (bring node.txt here)
    python benchmarks/offline_wheels.py node.txt --python-version 3.12 [--list] [--dest .whl]
    # on the node: pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    #              PYTHONPATH=/tmp/site make gpu-bench SYSTEM_PYTHON=1

The requirement closure of ``dml`` (install_requires plus the ``cpu`` extra: faiss-cpu) is read
from this machine's installed metadata (so run it in the project's .venv), with environment
markers judged for the node's Python (``--python-version``, its ``python3 --version``). A
package the node lists ends the walk there: its own requirements are the node's business. The
node's torch stack is never replaced: with torch on the node, torchvision, torchaudio, triton
and the nvidia-* / cuda-* libraries are left out (a torchvision built for another torch does not
load). The rest is downloaded at this machine's versions with ``--no-deps`` for the node's
Python and manylinux x86-64; ``--list`` prints it without downloading. ``--skip faiss-cpu``
leaves faiss out (about 18 MB): the evaluation's exact rank pass does not use it, NMI's
k-means then runs in scikit-learn, and the k-NN searches in torch.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
from typing import Dict, Iterable

from packaging.requirements import Requirement

DISTRIBUTION = "dml-lightning"  # setup.cfg's name (the import name is dml)
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


TORCH_STACK = ("torch", "torchvision", "torchaudio", "triton")


def torch_bound(name: str) -> bool:
    """Packages that come with (and must match) a torch install."""
    return name in TORCH_STACK or name.startswith(("nvidia-", "cuda-"))


def closure(
    name: str, extras: Iterable[str] = (), have: Iterable[str] = (), python_version: str = ""
) -> Dict[str, str]:
    """{package: installed version} of ``name`` and everything it requires, recursively; the
    walk stops at the packages in ``have`` (listed, not entered); markers judged for
    ``python_version`` (default: this interpreter's)."""
    found: Dict[str, str] = {}
    stop = {normal(h) for h in have}

    def applies(req: Requirement, wanted: Iterable[str]) -> bool:
        if req.marker is None:
            return True
        env = {"python_version": python_version} if python_version else {}
        return any(req.marker.evaluate({**env, "extra": e}) for e in ("", *wanted))

    def walk(package: str, wanted: Iterable[str]) -> None:
        key = normal(package)
        if key in found:
            return
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            return
        found[key] = dist.version
        if key in stop:
            return
        for line in dist.requires or []:
            req = Requirement(line)
            if applies(req, wanted):
                walk(req.name, req.extras)

    walk(name, tuple(extras))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("node_packages", help="the node's `pip list --format=freeze` output")
    parser.add_argument(
        "--python-version",
        required=True,
        help="the node's Python, e.g. 3.12 (its `python3 --version`)",
    )
    parser.add_argument("--dest", default=".whl")
    parser.add_argument("--skip", nargs="*", default=[], help="packages not to download")
    parser.add_argument("--list", action="store_true", help="print the list, download nothing")
    args = parser.parse_args()
    try:
        with open(args.node_packages) as f:
            have = {
                normal(re.split(r"[=<>@ ]", line.strip())[0])
                for line in f
                if line.strip() and not line.startswith("#")
            }
    except OSError as error:
        parser.error(f"{args.node_packages}: {error.strerror}")
    need = closure(DISTRIBUTION, ["cpu"], have, args.python_version)
    need.pop(DISTRIBUTION, None)
    skip = {normal(s) for s in args.skip}
    if "torch" in have:
        skip |= {k for k in need if torch_bound(k)}
    missing = {k: v for k, v in sorted(need.items()) if k not in have and k not in skip}
    print(
        f"{len(need)} packages needed, {len(missing)} missing on the node (Python "
        f"{args.python_version}): " + ", ".join(f"{k}=={v}" for k, v in missing.items())
    )
    if not missing or args.list:
        return 0
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        args.python_version,
        "--implementation",
        "cp",
        "-d",
        args.dest,
    ]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return subprocess.call(command + [f"{k}=={v}" for k, v in missing.items()])


if __name__ == "__main__":
    sys.exit(main())
