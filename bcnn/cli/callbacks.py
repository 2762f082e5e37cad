"""The Hydra callbacks of ``bcnn-train`` (``hydra.callbacks`` in ``configs/train.yaml``):
one run directory for every torchrun process, claimed before Hydra writes there; a SLURM
launcher only on a cluster; no search over stages that do not run; a sweep's summary.
"""

from __future__ import annotations

import logging
import shutil
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from bcnn.config import STAGES
from bcnn.engine import distributed as D
from bcnn.engine.runs import RunDirectoryError, settle_run_dir
from bcnn.reproduce.collect import summarize_sweep

log = logging.getLogger(__name__)
PROG = "bcnn-train"


class TrainCallbacks(Callback):
    """What ``bcnn-train`` does around Hydra's runs and sweeps."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Fixes ``hydra.run.dir`` before Hydra writes ``.hydra/`` into it.

        Rank 0 settles it (a fresh run claims it, a resumed run keeps its own) and every
        torchrun process follows, since each would resolve ``${now:...}`` itself; only rank
        0 writes Hydra's files and log. A refused run exits with one message, writing nothing.
        """
        env = D.env_from_torchrun()
        D.init()
        outcome: tuple[str, bool] | RunDirectoryError | None = None
        if env.rank == 0:
            try:
                outcome = settle_run_dir(config)
            except RunDirectoryError as err:
                outcome = err
        outcome = D.broadcast_object(outcome)
        if isinstance(outcome, RunDirectoryError):
            sys.exit(f"{PROG}: error: {outcome}" if env.rank == 0 else 1)
        assert outcome is not None
        run_dir, resumed = outcome
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = run_dir
            if resumed or env.rank > 0:
                config.hydra.output_subdir = None
            if env.rank > 0:
                config.hydra.job_logging = {"version": 1, "root": {"level": "ERROR"}}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuses a SLURM launcher without SLURM; drops searched keys of unused stages."""
        launcher = config.hydra.runtime.choices.get("hydra/launcher")
        if launcher in ("slurm", "submitit_slurm") and shutil.which("srun") is None:
            sys.exit(
                f"{PROG}: error: hydra/launcher={launcher} submits the jobs to SLURM, but this "
                "machine has no srun (it is not a SLURM node): run the sweep on the cluster, "
                "or here with hydra/launcher=joblib (or submitit_local)"
            )
        if launcher == "slurm" and OmegaConf.is_missing(config.hydra.launcher, "partition"):
            sys.exit(f"{PROG}: error: set hydra.launcher.partition=<your GPU partition>")
        params = config.hydra.sweeper.get("params")
        idle = [s for s in STAGES if s not in config.trainer.stages]
        unused = [k for k in params or () if k.split(".")[:2] in (["trainer", s] for s in idle)]
        if unused:
            stages = list(config.trainer.stages)
            log.info("Not searching %s: trainer.stages=%s", ", ".join(unused), stages)
            with open_dict(params):
                for key in unused:
                    del params[key]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Writes the sweep's summary into its directory."""
        table = summarize_sweep(config.hydra.sweep.dir)
        log.info("Sweep summary of %d jobs: %s/summary.md", len(table), config.hydra.sweep.dir)
