"""Metric loggers: ``metrics.csv`` and ``curves.png`` always, TensorBoard and wandb on request.

Each option of the ``logger`` group is a :class:`Loggers` node with one backend under its
own key, so ``logger=[tensorboard,wandb]`` merges them into one node.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import math
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf

from bcnn.engine.curves import plot_training_curves
from bcnn.limits import Check, NonEmpty, PositiveInt, checked, non_empty, writable_dir

# Relative to the run directory (checked with it); an absolute one is checked here.
LogDir = Annotated[
    str,
    Check(non_empty),
    Check(lambda p: writable_dir(p) if Path(str(p)).is_absolute() else None, files=True),
]


# The columns of metrics.csv; optional ones (ema_val_acc) follow when a row has them.
COLUMNS = (
    "stage",
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_acc",
    "val_mean_class_acc",
    "seconds",
)


def _numbers(mapping: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, float]:
    """The finite int/float values of ``mapping`` (NaN means "not measured": left out)."""
    return {
        k: float(v)
        for k, v in mapping.items()
        if k not in skip
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def _optional(extra: str, module: str | None = None) -> Any:
    """Imports ``module`` (default: ``extra``) of ``logger=<extra>``, or names the extra."""
    try:
        return importlib.import_module(module or extra)
    except ImportError as err:
        raise ImportError(
            f"logger={extra} needs the {extra} package: pip install 'bcnn[{extra}]' (or use "
            "the default logger=csv)"
        ) from err


class Logger:
    """What the trainer calls; a backend overrides what it records (the rest does nothing)."""

    def restore(self, rows: Sequence[Mapping[str, Any]], step: int | None = None) -> None:
        """Continues a resumed run after its history ``rows`` and optimizer ``step``."""

    def log_epoch(self, row: Mapping[str, Any], step: int | None = None) -> None:
        """Records one epoch's metrics (keys: ``COLUMNS``) at optimizer step ``step``."""

    def log_step(self, values: Mapping[str, float], step: int) -> None:
        """Records scalars by tag (``<stage>/step_train_loss``) at optimizer step ``step``."""

    def log_summary(self, results: Mapping[str, Any]) -> None:
        """Records the final results."""

    def close(self) -> None:
        """Finishes writing."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this logger (e.g. the wandb run id a resume continues)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restores ``state_dict()``'s content."""


class CSVLogger(Logger):
    """Keeps ``<output_dir>/metrics.csv`` at one row per stage and epoch (rewritten whole,
    atomically); ``close`` draws ``<output_dir>/curves.png`` from it."""

    def __init__(self, output_dir: str | Path, run_config: Mapping[str, Any] | None = None) -> None:
        self.path = Path(output_dir) / "metrics.csv"
        self.curves = Path(output_dir) / "curves.png"
        self.rows: list[Mapping[str, Any]] = []

    def restore(self, rows: Sequence[Mapping[str, Any]], step: int | None = None) -> None:
        self.rows = list(rows)
        self._write()

    def log_epoch(self, row: Mapping[str, Any], step: int | None = None) -> None:
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        extra = dict.fromkeys(k for row in self.rows for k in row if k not in COLUMNS)
        columns = [*COLUMNS, *extra]
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: row.get(k) for k in columns} for row in self.rows)
        tmp.replace(self.path)

    def close(self) -> None:
        if self.path.exists():
            plot_training_curves(self.path, self.curves)


class TensorBoardLogger(Logger):
    """TensorBoard event files under ``<output_dir>/<log_dir>``: scalars ``<stage>/<key>``
    per epoch and per ``trainer.log_every_n_steps`` steps, the results under ``final/``, the
    config as text. The x axis is the optimizer step over all stages (a call without a step
    goes one past the last point). A resumed run drops the events its previous process
    wrote after the checkpoint (``purge_step``), so no point appears twice.

    Args:
        log_dir: Sub-folder of the event files (``tensorboard --logdir <run dir>``).
        flush_secs: How often the writer flushes to disk.
    """

    @checked
    def __init__(
        self,
        output_dir: str | Path,
        run_config: Mapping[str, Any] | None = None,
        log_dir: LogDir = "tensorboard",
        flush_secs: PositiveInt = 30,
    ) -> None:
        _optional("tensorboard")  # what torch.utils.tensorboard writes with
        self._writer_class = _optional("tensorboard", "torch.utils.tensorboard").SummaryWriter
        self.dir = Path(output_dir) / log_dir
        self.flush_secs = flush_secs
        self.run_config = dict(run_config or {})
        self.step = 0  # where the next point goes when the caller gives no step
        self.resumed_at: int | None = None
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``, opened on first use (after a resume has set its step)."""
        if self._writer is None:
            self._writer = self._writer_class(
                str(self.dir), flush_secs=self.flush_secs, purge_step=self.resumed_at
            )
            if self.resumed_at is None and self.run_config:
                text = OmegaConf.to_yaml(OmegaConf.create(self.run_config))
                self._writer.add_text("config", f"```yaml\n{text}\n```", 0)
        return self._writer

    def restore(self, rows: Sequence[Mapping[str, Any]], step: int | None = None) -> None:
        self.step = self.resumed_at = len(rows) if step is None else step + 1

    def _add(self, scalars: Mapping[str, float], step: int | None) -> None:
        writer, at = self.writer, self.step if step is None else step
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, at)
        self.step = at + 1

    def log_epoch(self, row: Mapping[str, Any], step: int | None = None) -> None:
        stage = row.get("stage", "train")
        self._add({f"{stage}/{k}": v for k, v in _numbers(row, ("stage", "epoch")).items()}, step)

    def log_step(self, values: Mapping[str, float], step: int) -> None:
        self._add(_numbers(values), step)

    def log_summary(self, results: Mapping[str, Any]) -> None:
        """Adds the final accuracies (``final/<key>``) and those of each stage."""
        for key, value in _numbers(results, skip=("num_parameters", "world_size")).items():
            self.writer.add_scalar(f"final/{key}", value, self.step)
        for stage, values in (results.get("stages") or {}).items():
            for key, value in _numbers(values).items():
                self.writer.add_scalar(f"final/{stage}/{key}", value, self.step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbLogger(Logger):
    """Weights & Biases logging; offline unless configured.

    The run id is chosen up front and kept in ``state_dict()`` (so in every checkpoint): a
    resumed process continues the same wandb run instead of starting a second one.

    Args:
        output_dir: The run directory; wandb's files go under it.
        entity: wandb team or user; ``None``: the account's default.
        mode: ``offline`` (default: nothing leaves the machine), ``online`` or ``disabled``.
        name: Run name shown by wandb (``None``: wandb picks one).
    """

    @checked
    def __init__(
        self,
        output_dir: str | Path,
        run_config: Mapping[str, Any] | None = None,
        project: NonEmpty = "bcnn",
        entity: str | None = None,
        mode: Literal["offline", "online", "disabled"] = "offline",
        tags: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        self._wandb = _optional("wandb")
        self.settings = dict(
            project=project, entity=entity, mode=mode, tags=list(tags), name=name,
            dir=str(output_dir), config=dict(run_config or {}),
        )  # fmt: skip
        # Chosen here (wandb ids: lowercase letters and digits) for checkpoints to keep.
        self.run_id: str = secrets.token_hex(6)
        self._run: Any = None

    @property
    def run(self) -> Any:
        """The wandb run, started (or resumed, by ``run_id``) on first use."""
        if self._run is None:
            self._run = self._wandb.init(id=self.run_id, resume="allow", **self.settings)
        return self._run

    def log_epoch(self, row: Mapping[str, Any], step: int | None = None) -> None:
        stage = row.get("stage", "train")
        data = {f"{stage}/{k}": v for k, v in _numbers(row, skip=("stage",)).items()}
        self.run.log(data, step=step)

    def log_step(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(_numbers(values), step=step)

    def log_summary(self, results: Mapping[str, Any]) -> None:
        """Sets the run's summary to the final results."""
        self.run.summary.update(_numbers(results))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Adopts a checkpoint's run id (before the run starts)."""
        if state and state.get("run_id"):
            if self._run is not None and self._run.id != state["run_id"]:
                raise RuntimeError("WandbLogger.load_state_dict: the wandb run already started")
            self.run_id = str(state["run_id"])


class Loggers(Logger):
    """Several loggers behind the interface of one: ``backends`` are logger config nodes by
    name, built with ``output_dir`` and ``run_config`` (``None`` values are dropped); the
    CSV logger is always among them."""

    def __init__(
        self,
        output_dir: str | Path,
        run_config: Mapping[str, Any] | None = None,
        **backends: Any,
    ) -> None:
        from bcnn.errors import instantiate

        self.loggers: dict[str, Logger] = {}
        if "csv" not in backends:
            self.loggers["csv"] = CSVLogger(output_dir, run_config)
        for name, node in backends.items():
            if node is None:
                continue
            if isinstance(node, Mapping) and not isinstance(node, DictConfig):
                node = OmegaConf.create(dict(node))
            if not isinstance(node, DictConfig) or "_target_" not in node:
                raise ValueError(
                    f"Invalid config value for 'logger.{name}': a logger needs a _target_ "
                    "(choose logger=csv, tensorboard or wandb, or a list of them)"
                )
            self.loggers[name] = instantiate(
                node, output_dir=output_dir, run_config=run_config, _recursive_=False
            )

    def restore(self, rows: Sequence[Mapping[str, Any]], step: int | None = None) -> None:
        for logger in self.loggers.values():
            logger.restore(rows, step)

    def log_epoch(self, row: Mapping[str, Any], step: int | None = None) -> None:
        for logger in self.loggers.values():
            logger.log_epoch(row, step)

    def log_step(self, values: Mapping[str, float], step: int) -> None:
        for logger in self.loggers.values():
            logger.log_step(values, step)

    def log_summary(self, results: Mapping[str, Any]) -> None:
        for logger in self.loggers.values():
            logger.log_summary(results)

    def close(self) -> None:
        """Closes every logger even when one fails (one backend must not lose the others'
        files, curves.png among them); the failure is raised after."""
        with contextlib.ExitStack() as stack:
            for logger in self.loggers.values():
                stack.callback(logger.close)

    def state_dict(self) -> dict[str, Any]:
        return {name: logger.state_dict() for name, logger in self.loggers.items()}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        for name, logger in self.loggers.items():
            logger.load_state_dict((state or {}).get(name))
