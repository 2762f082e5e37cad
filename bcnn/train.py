"""Hydra entry point: ``python train.py``, ``python -m bcnn.train`` and ``bcnn-train``."""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import bcnn.config  # noqa: F401  (registers the structured-config schema)
from bcnn.engine import distributed as D
from bcnn.engine import train
from bcnn.engine.trainer import run_dir_in_use
from bcnn.errors import user_errors

log = logging.getLogger(__name__)

# Launcher and sweeper options -> the plugin module that provides them and its extra.
PLUGINS = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "launchers"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "hparams_search=": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
}
# What the task function may return (``hparams_search.optimized_metric``): validation
# metrics only, so that a search never selects on the test split.
OPTIMIZABLE = ("val_acc", "val_mean_class_acc")


def _check_plugins(argv: list[str]) -> None:
    for arg in argv:
        for prefix, (module, extra) in PLUGINS.items():
            if arg.startswith(prefix) and importlib.util.find_spec(module) is None:
                sys.exit(
                    f"{arg} needs the {module.split('.')[-1]} plugin: pip install 'bcnn[{extra}]'"
                )


def _agree_on_run_dir(argv: list[str]) -> None:
    # Under torchrun every process composes its own config, and Hydra's ${now:...} may
    # tick between them: fix one run directory for all, and let only rank 0 log to it.
    env = D.env_from_torchrun()
    if not env.enabled or "-m" in argv or "--multirun" in argv:
        return
    D.init()
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        # The same form as configs/train.yaml's, with the unique suffix chosen by rank 0.
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S") + "_" + secrets.token_hex(3)
        argv.append(f"hydra.run.dir=outputs/{D.broadcast_object(stamp)}")
    if env.rank > 0:
        argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]


def _refuse_a_used_run_dir(argv: list[str]) -> None:
    # Hydra writes .hydra/ into hydra.run.dir before any bcnn code runs: an explicit
    # directory holding another run is refused first, so the other run's files survive.
    if "-m" in argv or "--multirun" in argv or any(a.startswith("trainer.resume=") for a in argv):
        return
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            problem = run_dir_in_use(arg.split("=", 1)[1])
            if problem is not None:
                sys.exit(f"bcnn-train: error: {problem}")


def optimized_metric(cfg: DictConfig) -> str:
    """The results key the task function returns: ``hparams_search.optimized_metric``.

    Raises:
        ValueError: the key names anything but a validation metric.
    """
    search = cfg.get("hparams_search")
    name = str(search.get("optimized_metric", "val_acc")) if search else "val_acc"
    if name not in OPTIMIZABLE:
        raise ValueError(
            f"Invalid config value for 'hparams_search.optimized_metric': {name!r}; choose "
            f"one of {OPTIMIZABLE} (tuning on the test split would select on it)"
        )
    return name


def objective(results: Mapping[str, Any], metric: str = "val_acc") -> float:
    """The number a sweep optimizes: ``results[metric]``, always a number.

    Without a validation split (``dataset.val_fraction=0``) the validation metrics are
    None; the last epoch's training accuracy (from ``metrics.csv``) stands in, with a
    warning, so that a sweep can still rank its runs.

    Args:
        results: What ``bcnn.engine.train`` returned.
        metric: A key of ``OPTIMIZABLE``.

    Returns:
        The metric in percent (NaN only when neither it nor a training epoch exists).
    """
    value = results.get(metric)
    if value is not None and math.isfinite(float(value)):
        return float(value)
    train_acc = math.nan
    metrics = Path(str(results.get("output_dir", ""))) / "metrics.csv"
    if metrics.is_file():
        with metrics.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("train_acc")]
        if rows:
            train_acc = float(rows[-1]["train_acc"])
    log.warning(
        "%s is not available (no validation split: dataset.val_fraction=0); returning the "
        "last epoch's training accuracy %.2f instead, which rewards overfitting: keep a "
        "validation split for hyper-parameter search",
        metric,
        train_acc,
    )
    return train_acc


@hydra.main(version_base="1.3", config_path="pkg://bcnn.configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    with user_errors("bcnn-train"):
        metric = optimized_metric(cfg)
        return objective(train(cfg), metric)


def main() -> None:
    """Trains one configuration (or a ``-m`` sweep, or an ``hparams_search``).

    The task function returns the optimized metric (``hparams_search.optimized_metric``,
    default ``val_acc``) to Hydra's sweepers.
    """
    _check_plugins(sys.argv[1:])
    _refuse_a_used_run_dir(sys.argv[1:])
    _agree_on_run_dir(sys.argv)
    _hydra_main()


if __name__ == "__main__":
    main()
