"""Shared test helpers: composing configs and running train.py in a subprocess."""

from __future__ import annotations

import copy
import importlib.util
import os
import pickle
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
from tests import _warm

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


def _speed_up_composition() -> list[tuple[object, str, object]]:
    """Two shortcuts in Hydra's composition for this test process; results are unchanged.

    The suite composes configs about a thousand times, a quarter of its CPU time.

    - Hydra reads and parses every file of the defaults tree again on each compose. Files
      of the installed ``bcnn.configs`` package do not change during a test session: each
      is parsed once per process and copied on the way out, because Hydra builds on it.
      Other sources (a test's own ``file://`` search path) are read as usual.
    - For each config of the tree, Hydra turns every group choice made so far into an
      OmegaConf config, which only a defaults-list interpolation (``- db: ${choice}``)
      reads: built only where the defaults list has one (a fifth of a compose's time).

    Returns (owner, attribute, original) of what it replaced, for the test that composes
    with and without the shortcuts.
    """
    from hydra._internal import defaults_list
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.core_plugins.file_config_source import FileConfigSource

    load = ConfigRepository.load_config
    # Pickled where it pickles: unpickling is ~8 times faster than deepcopy. Structured
    # configs (the train schema's dataclass) do not pickle and are deep-copied.
    cache: dict[tuple[tuple[str, ...], str], tuple[bytes | None, object]] = {}

    def load_config(self: ConfigRepository, config_path: str):  # type: ignore[no-untyped-def]
        if any(isinstance(source, FileConfigSource) for source in self.sources):
            return load(self, config_path)
        key = (tuple(source.full_path() for source in self.sources), config_path)
        if key not in cache:
            result = load(self, config_path)
            try:
                cache[key] = (pickle.dumps(result), None)
            except (pickle.PicklingError, TypeError, AttributeError):
                cache[key] = (None, result)
        pickled, result = cache[key]
        return pickle.loads(pickled) if pickled is not None else copy.deepcopy(result)

    ConfigRepository.load_config = load_config  # type: ignore[method-assign]

    interpolation_map = defaults_list._create_interpolation_map

    def create_interpolation_map(overrides, defaults, self_added):  # type: ignore[no-untyped-def]
        # Its one caller reads the map only for the interpolated entries of ``defaults``.
        if not any(d.is_interpolation() for d in defaults):
            return None
        return interpolation_map(overrides, defaults, self_added)

    defaults_list._create_interpolation_map = create_interpolation_map
    return [
        (ConfigRepository, "load_config", load),
        (defaults_list, "_create_interpolation_map", interpolation_map),
    ]


HYDRA_ORIGINALS = _speed_up_composition()


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
    warm: bool = True,
) -> subprocess.CompletedProcess:
    """Runs ``python train.py *args`` (or ``script``) and captures its output.

    ``full_error=False`` runs without ``HYDRA_FULL_ERROR``: errors print as users see them.
    ``warm`` forks ``python file.py`` and ``python -m module`` commands from a process that
    has imported torch already (tests/_warm.py); ``warm=False`` starts a new interpreter.
    """
    cmd = [*(script or train_command()), *args]
    env = subprocess_env(full_error)
    if warm and _warm.runnable(cmd):
        return _warm.run(cmd, cwd, env, timeout)
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


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


def start_train(args: Sequence[str]) -> _warm.Process:
    """``python train.py *args`` started in the background, with :func:`subprocess_env`,
    forked like :func:`run_train`'s runs (tests/_warm.py); ``communicate`` returns the
    output as text."""
    return _warm.Process([*train_command(), *args], REPO_ROOT, subprocess_env())


@pytest.fixture
def smoke_overrides() -> list[str]:
    """Overrides that make a full two-stage run take a second or two."""
    return ["debug=smoke", "dataset.trainval_size=120", "dataset.test_size=60"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The end-to-end runs (marked ``slow``) first, in their file order.

    Under ``pytest -n 2`` a long run that starts last keeps one worker busy while the other
    has nothing left to do; started first, the short tests fill in around it.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
