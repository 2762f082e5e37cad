"""Shared test helpers: composing configs and running train.py in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

import bcnn.config  # noqa: F401  (registers the schema)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
# Under ``pytest -n N`` each worker, and each process a test starts, would otherwise use
# one thread per core: N times oversubscribed, where OpenMP's spinning threads run many
# times slower.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, (os.cpu_count() or 1) // WORKERS)


def load_script(name: str) -> ModuleType:
    """Imports ``scripts/<name>.py`` (not a package) as the module ``name``.

    Registered in ``sys.modules`` first: dataclasses look their module up there.
    """
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def _threads_per_worker():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (``pytest.mark.usefixtures("one_thread")``).

    For tests of thousands of tiny ops (EM iterations, SVM steps, gradcheck): on a loaded
    machine every multi-threaded one costs milliseconds of thread wake-up.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def compose_config(overrides: Sequence[str] = (), output_dir: Path | None = None) -> DictConfig:
    """Composes ``configs/train.yaml`` like ``train.py`` would, with ``overrides``."""
    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        return compose("train", overrides=[*overrides, *extra])


def run_train(
    args: Sequence[str],
    cwd: Path = REPO_ROOT,
    timeout: float = 300,
    script: Sequence[str] = (),
    full_error: bool = True,
) -> subprocess.CompletedProcess:
    """Runs ``python train.py *args`` (or ``script``) and captures its output.

    ``full_error=False`` runs without ``HYDRA_FULL_ERROR``: errors print as users see them.
    """
    cmd = [*(script or train_command()), *args]
    return subprocess.run(
        cmd, cwd=cwd, env=subprocess_env(full_error), capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def subprocess_env(full_error: bool = True, threads: int = THREADS) -> dict[str, str]:
    """The environment of every process a test starts: one thread count for all of them.

    A run and the reference it is compared with must use the same number of threads (float
    sums differ in the last bits otherwise), whatever the machine's load or core count.
    """
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env |= {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    env["MKL_NUM_THREADS"] = str(threads)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return env


def train_command() -> list[str]:
    """``python train.py`` of this checkout."""
    return [sys.executable, str(REPO_ROOT / "train.py")]


def start_train(args: Sequence[str], **popen: object) -> subprocess.Popen:
    """``python train.py *args`` started in the background, with :func:`subprocess_env`."""
    return subprocess.Popen(  # type: ignore[call-overload]
        [*train_command(), *args], cwd=REPO_ROOT, env=subprocess_env(), **popen
    )


@pytest.fixture
def smoke_overrides() -> list[str]:
    """Overrides that make a full two-stage run take a second or two."""
    return ["debug=smoke", "dataset.trainval_size=120", "dataset.test_size=60"]
