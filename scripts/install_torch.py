"""Install a torch/torchvision pair that belong together into the running Python.

Usage (``make`` runs it in a new virtual environment, before bcnn itself)::

    .venv/bin/python scripts/install_torch.py [--dry-run]

torchvision's compiled operators load only into the torch build they were made for: the
same version (torchvision's metadata pins it, e.g. ``torch==2.5.1``) and the same build
variant, which pip does not compare. The variant is the local version label: ``+cpu``
from PyTorch's CPU index, none for PyPI's default (CUDA on Linux) build. A CPU torch
beside a PyPI torchvision imports, then fails with ``operator torchvision::nms does not
exist``. So this script

1. picks where to look: with no NVIDIA GPU (``nvidia-smi`` missing or failing) it adds
   PyTorch's CPU index, where reachable, to pip's configured indexes (its ``+cpu``
   builds sort above the same version without a label, so pip prefers them). Where that
   index is unreachable it looks for a CPU pair among what pip can see (its configured
   indexes, ``find-links`` / ``PIP_FIND_LINKS`` wheel folders: ``pip index versions``)
   and takes the newest; only with no CPU torchvision at all does it install PyPI's
   CUDA build, and says so, with its size, before installing. With a GPU: pip's
   configured indexes. ``TORCH_INDEX_URL`` chooses an index instead (e.g.
   https://download.pytorch.org/whl/cu126);
2. lets pip resolve both packages together (``pip install --dry-run --report``) and,
   while their labels differ, excludes the odd one and resolves again;
3. installs exactly that pair and checks that ``torchvision.ops.nms`` runs.

The version floors come from pyproject.toml. Only the standard library is used: nothing
else is installed yet when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PIP = [sys.executable, "-m", "pip"]
CHECK = (
    "import torch, torchvision; "
    "torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5); "
    "print(torch.__version__, torchvision.__version__)"
)
MAX_ROUNDS = 4

# Measured for torch 2.14.1+cu130 (Linux x86_64, Python 3.11): the 32 wheels of torch,
# torchvision and their dependencies (nvidia-* included), and a .venv with bcnn[dev].
CUDA_SIZE = "about 3 GB of wheels, a 6.4 GB environment"

# (torch version, torchvision version) that pip would install, given extra requirements.
Resolver = Callable[[Sequence[str]], tuple[str, str]]
# The versions of a package pip can see (newest first).
Lister = Callable[[str], list[str]]
# (pip index arguments, preferred label, what and why, the pair when already chosen).
Plan = tuple[list[str], str | None, str, tuple[str, str] | None]


class InstallError(RuntimeError):
    """No working pair could be resolved or installed; the message says why."""


def requirements(pyproject: str) -> list[str]:
    """The ``torch`` and ``torchvision`` requirements declared in pyproject.toml's text.

    A regular expression rather than tomllib: this runs on Python 3.10 too.
    """
    found = re.findall(r'"(torch(?:vision)?\s*[<>=!~][^"]*)"', pyproject)
    names = [re.match(r"[a-z]+", spec).group(0) for spec in found]  # type: ignore[union-attr]
    if sorted(names) != ["torch", "torchvision"]:
        raise InstallError(f"{PYPROJECT}: expected one torch and one torchvision requirement")
    return found


def label(version: str) -> str:
    """The local version label: ``"2.5.1+cpu"`` -> ``"cpu"``, ``"2.5.1"`` -> ``""``."""
    return version.partition("+")[2]


def has_nvidia_gpu() -> bool:
    """Whether ``nvidia-smi`` exists and lists a GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "GPU" in proc.stdout


def reachable(index: str, timeout: float = 10.0) -> bool:
    """Whether ``index`` answers for the torch project page."""
    try:
        with urllib.request.urlopen(f"{index.rstrip('/')}/torch/", timeout=timeout):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def pip_resolver(index_args: Sequence[str], specs: Sequence[str]) -> Resolver:
    """A resolver that asks pip what ``pip install <specs> <extra>`` would install."""

    def resolve(extra: Sequence[str]) -> tuple[str, str]:
        cmd = [*PIP, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-"]
        proc = subprocess.run(
            [*cmd, *index_args, *specs, *extra], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise InstallError(
                f"pip cannot resolve {' '.join([*specs, *extra])}:\n{proc.stderr[-2000:]}"
            )
        report = json.loads(proc.stdout)
        versions = {
            item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in report["install"]
        }
        return versions["torch"], versions["torchvision"]

    return resolve


def pip_versions(name: str) -> list[str]:
    """The versions of ``name`` pip can see, newest first: its configured indexes and
    find-links folders, local labels included (``pip index versions``)."""
    cmd = [*PIP, "index", "versions", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = re.search(r"Available versions: (.*)", proc.stdout)
    return [v.strip() for v in found.group(1).split(",")] if found else []


def cpu_pair(versions: Lister, resolve: Resolver) -> tuple[str, str] | None:
    """The newest CPU torch and CPU torchvision pip can install together, or None.

    Each CPU torchvision (newest first) is resolved with its own torch pin: pip takes
    the ``+cpu`` torch of that version where one is available (it sorts above the
    unlabelled build). A CPU torch beside a CUDA torchvision is no pair.
    """
    for vision in (v for v in versions("torchvision") if label(v) == "cpu"):
        try:
            pair = resolve([f"torchvision=={vision}"])
        except InstallError:
            continue
        if label(pair[0]) == label(pair[1]) == "cpu":
            return pair
    return None


def choose_pair(resolve: Resolver, prefer: str | None) -> tuple[str, str]:
    """Resolves until torch and torchvision carry the same local label.

    Args:
        resolve: Returns the pair pip would install given extra exclusions.
        prefer: The label the pair should have (``"cpu"``, ``""`` for PyPI's default
            build) or None for whatever torch gets: of a mismatched pair, the one
            without this label is excluded.

    Returns:
        ``(torch_version, torchvision_version)`` with equal labels.

    Raises:
        InstallError: no agreeing pair within a few rounds.
    """
    excluded: list[str] = []
    for _ in range(MAX_ROUNDS):
        torch_v, vision_v = resolve(excluded)
        if label(torch_v) == label(vision_v):
            return torch_v, vision_v
        wanted = label(torch_v) if prefer is None else prefer
        odd = ("torchvision", vision_v) if label(torch_v) == wanted else ("torch", torch_v)
        print(f"[install_torch] torch {torch_v} and torchvision {vision_v} are different builds")
        excluded.append(f"{odd[0]}!={odd[1]}")
    raise InstallError(
        "no torch/torchvision pair of the same build found (excluded: "
        f"{', '.join(excluded)}). Choose an index with both, e.g. "
        f"TORCH_INDEX_URL={CPU_INDEX}"
    )


def plan(resolver: Callable[[list[str]], Resolver], versions: Lister = pip_versions) -> Plan:
    """Where to look, and the pair itself when it had to be found here.

    Args:
        resolver: A resolver for pip index arguments (``pip_resolver`` with the floors).
        versions: What pip can see of a package (``pip_versions``).
    """
    override = os.environ.get("TORCH_INDEX_URL")
    if override:
        return ["--index-url", override], None, f"TORCH_INDEX_URL={override}", None
    if has_nvidia_gpu():
        return [], None, "an NVIDIA GPU is present: pip's configured indexes (CUDA build)", None
    if reachable(CPU_INDEX):
        where = f"no NVIDIA GPU: CPU build ({CPU_INDEX})"
        return ["--extra-index-url", CPU_INDEX], "cpu", where, None
    pair = cpu_pair(versions, resolver([]))
    if pair:
        return [], "cpu", f"no NVIDIA GPU, {CPU_INDEX} unreachable: a CPU pair pip has", pair
    return (
        [],
        "",
        f"WARNING: no NVIDIA GPU and {CPU_INDEX} is unreachable, and pip sees no CPU "
        "torchvision (a CPU torch beside a CUDA torchvision cannot load its operators): "
        f"installing PyPI's build, which includes CUDA ({CUDA_SIZE}). To keep to the CPU "
        "build, put torch-*+cpu and torchvision-*+cpu wheels into a folder named by "
        "PIP_FIND_LINKS, or set TORCH_INDEX_URL to an index that has both",
        None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Chooses, installs and checks the pair; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the pair, install nothing")
    args = parser.parse_args(argv)
    try:
        specs = requirements(PYPROJECT.read_text())
        index_args, prefer, where, pair = plan(lambda args: pip_resolver(args, specs))
        print(f"[install_torch] {where}")
        torch_v, vision_v = pair or choose_pair(pip_resolver(index_args, specs), prefer)
        print(f"[install_torch] torch=={torch_v} torchvision=={vision_v}")
        if args.dry_run:
            return 0
        pins = [f"torch=={torch_v}", f"torchvision=={vision_v}"]
        if subprocess.run([*PIP, "install", *index_args, *pins], check=False).returncode:
            raise InstallError(f"pip install {' '.join(pins)} failed (output above)")
    except InstallError as err:
        print(f"[install_torch] error: {err}", file=sys.stderr)
        return 1
    check = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(
            f"[install_torch] error: torch {torch_v} and torchvision {vision_v} are installed "
            f"but do not work together: {last}\nRemove the environment (make clean) and retry; "
            "TORCH_INDEX_URL=<index with both> picks the builds.",
            file=sys.stderr,
        )
        return 1
    print(f"[install_torch] ok: torch and torchvision import and run ({check.stdout.strip()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
