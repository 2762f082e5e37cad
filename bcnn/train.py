"""Hydra entry point: ``python train.py``, ``python -m bcnn.train`` and ``bcnn-train``."""

from __future__ import annotations

import importlib.util
import sys
import time

import hydra
from omegaconf import DictConfig

import bcnn.config  # noqa: F401  (registers the structured-config schema)
from bcnn.engine import distributed as D
from bcnn.engine import train

# Launcher options -> the plugin module that provides them.
LAUNCHER_PLUGINS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "slurm": "hydra_plugins.hydra_submitit_launcher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
}


def _check_launcher(argv: list[str]) -> None:
    for arg in argv:
        if arg.startswith("hydra/launcher="):
            name = arg.split("=", 1)[1]
            module = LAUNCHER_PLUGINS.get(name)
            if module and importlib.util.find_spec(module) is None:
                sys.exit(
                    f"hydra/launcher={name} needs the {module.split('.')[-1]} plugin: "
                    "pip install 'bcnn[launchers]'"
                )


def _agree_on_run_dir(argv: list[str]) -> None:
    # Under torchrun every process composes its own config, and Hydra's ${now:...} may
    # tick between them: fix one run directory for all, and let only rank 0 log to it.
    env = D.env_from_torchrun()
    if not env.enabled or "-m" in argv or "--multirun" in argv:
        return
    D.init()
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        stamp = D.broadcast_object(time.strftime("%Y-%m-%d/%H-%M-%S"))
        argv.append(f"hydra.run.dir=outputs/{stamp}")
    if env.rank > 0:
        argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]


@hydra.main(version_base="1.3", config_path="pkg://bcnn.configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return train(cfg)["val_acc"]


def main() -> float | None:
    """Trains one configuration (or a ``-m`` sweep); returns the validation accuracy."""
    _check_launcher(sys.argv[1:])
    _agree_on_run_dir(sys.argv)
    return _hydra_main()


if __name__ == "__main__":
    main()
