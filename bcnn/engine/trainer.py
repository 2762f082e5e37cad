"""``train(cfg) -> results``: the two-stage training run behind ``train.py``.

The stages of ``trainer.stages`` run in order, each on images or cached descriptors
(``bcnn.engine.cache``) for its epochs (``bcnn.engine.stage``), in a run directory claimed by
``bcnn.engine.runs``. A failed run leaves that directory usable (README, "What a run writes").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, Subset

from bcnn.config import instantiate, validate
from bcnn.engine import distributed as D
from bcnn.engine import placement, runs
from bcnn.engine.cache import Split
from bcnn.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint
from bcnn.engine.loops import ConfusionMeter, EpochStats, autocast, evaluate
from bcnn.engine.stage import Selection, Stage, StageInputs, fit_on_cache, stage_inputs
from bcnn.errors import ConfigError, DivergenceError
from bcnn.models import BilinearModel, build_model
from bcnn.models.plan import check_plan

__all__ = ["DivergenceError", "check_batch_sizes", "train"]

log = logging.getLogger(__name__)


def check_batch_sizes(trainer: DictConfig, train_size: int, split: str = "train") -> None:
    """Refuses, before the model is built, a stage batch larger than the training split or
    a ``grad_accum`` above an epoch's batches; a limited run (``trainer.limit_train_batches``,
    ``debug=smoke``) only warns.

    Raises:
        ConfigError: naming ``trainer.<stage>.batch_size`` or ``.grad_accum``.
    """
    limit = trainer.limit_train_batches
    for name in trainer.stages:
        stage = trainer[name]
        batches = min(math.ceil(train_size / stage.batch_size), limit or math.inf)
        if stage.batch_size > train_size:
            key, problem = "batch_size", f"{stage.batch_size} exceeds the {train_size} images"
            problem += f" of the training split ({split}); use at most {train_size}"
        elif stage.grad_accum > batches:
            key, problem = "grad_accum", f"{stage.grad_accum} exceeds the {batches} batches"
            problem += f" of an epoch ({train_size} images of {split}); use at most {batches}"
            problem += " (recipe=small_data steps every 16 images: made for a few hundred)"
        else:
            continue
        if limit is None:
            raise ConfigError(f"trainer.{name}.{key}", problem)
        log.warning("trainer.%s.%s=%s: limited run, one step per epoch", name, key, problem)


def _check_stages(trainer: DictConfig, world_size: int) -> None:
    """Refuses, before any work, a global batch the processes cannot share and a plateau
    schedule in ``min`` mode (it watches an accuracy: higher is better)."""
    for name in trainer.stages:
        if trainer[name].batch_size % world_size:
            raise ConfigError(
                f"trainer.{name}.batch_size",
                f"the global batch {trainer[name].batch_size} must be divisible by the "
                f"{world_size} processes",
            )
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = instantiate(trainer[name].scheduler)(dummy)
        if isinstance(scheduler, ReduceLROnPlateau) and scheduler.mode != "max":
            raise ConfigError(
                f"trainer.{name}.scheduler.mode",
                f"{scheduler.mode!r}, but the schedule watches the validation accuracy (the "
                "training accuracy without a validation split), where higher is better: use max",
            )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Runs the training job of a composed config (``configs/train.yaml``), validated first.

    Returns:
        The content of ``results.json``: ``test_acc``, ``test_mean_class_acc``, ``val_acc``,
        ``val_mean_class_acc`` (percent, of the final model), ``stages`` (the same keys per
        stage) and ``output_dir``.

    Raises:
        ConfigError: an invalid config value (a ``ValueError``), naming the key.
        FileNotFoundError: a missing dataset file or resume checkpoint.
        CheckpointError: no usable checkpoint to resume from, or another run's.
        RunDirectoryError: a fresh run pointed at another run's directory.
        DivergenceError: the loss stopped being finite (no ``results.json`` is written).
    """
    ckpt, path, output_dir = None, None, None
    try:
        validate(cfg, files=True)
        if cfg.trainer.resume:
            cfg, ckpt, path = runs.resume(cfg)
            validate(cfg, files=True)
        env = D.init()
        _check_stages(cfg.trainer, env.world_size)
        # Every process writes into rank 0's directory (Hydra's ${now:...} may differ).
        chosen = placement.output_dir(cfg, "train.py", "bcnn.engine.train")
        output_dir = Path(D.broadcast_object(str(chosen)))
        run_id = runs.open_run(output_dir, ckpt, path, env)
        with runs.file_log(output_dir, env.is_main):
            return _Run(cfg, output_dir, ckpt, env, run_id).run()
    except BaseException:
        # A fresh run that failed before any work leaves its directory reusable.
        if not cfg.trainer.resume and D.env_from_torchrun().is_main:
            runs.release_run_dir(output_dir)
        raise


class _Run:
    """State of one run; ``run()`` executes it from the start or from a checkpoint."""

    def __init__(
        self,
        cfg: DictConfig,
        output_dir: Path,
        ckpt: dict[str, Any] | None,
        env: D.DistEnv,
        run_id: str,
    ) -> None:
        self.cfg, self.tcfg, self.out, self.ckpt, self.env = cfg, cfg.trainer, output_dir, ckpt, env
        self.ckdir, self.run_id = output_dir / "checkpoints", run_id
        self.device = placement.resolve_device(self.tcfg.device)
        if self.device.type == "cuda" and env.enabled:
            self.device = torch.device("cuda", env.local_rank)
        self.precision = str(self.tcfg.precision)
        self.progress = bool(self.tcfg.progress) and env.is_main
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        self.history: list[dict[str, Any]] = []
        self.stage_results: dict[str, dict[str, Any]] = {}
        self.logger: Any = None
        self.built_datasets: list[Split] = []
        self.step = 0  # optimizer steps over all stages: the loggers' x axis

    def run(self) -> dict[str, Any]:
        start_stage, start_epoch = self._set_up()
        t_start = time.time()
        for index, name in enumerate(self.tcfg.stages):
            if index >= start_stage:
                resume = self.ckpt if index == start_stage else None
                self._stage(index, name, resume, start_epoch if resume else 0)
        return self._finish(time.time() - t_start)

    def _set_up(self) -> tuple[int, int]:
        """Datasets, model, logger and the resumed state; returns where to start."""
        cfg, main = self.cfg, self.env.is_main
        if main:
            OmegaConf.save(self.resolved, self.out / "config.yaml")
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        val_fraction = float(cfg.dataset.get("val_fraction", 0.0) or 0.0)
        names = {"train": "train", "val": "val"} if val_fraction > 0 else {"train": "trainval"}
        # Built before the model: a missing or malformed dataset fails before weights load.
        self.splits = {
            role: (split, self._dataset(split, augment=role == "train"))
            for role, split in {**names, "test": "test"}.items()
        }
        for role, (split, ds) in self.splits.items():
            log.info("%s split (%s): %d images", role, split, len(ds))
            if len(ds) == 0 and role != "val":
                raise ValueError(f"dataset split '{split}' is empty ({cfg.dataset})")
            if hasattr(ds, "write_samples") and main:
                ds.write_samples(self.out / "splits" / f"{split}.txt")
        train_split, train_set = self.splits["train"]
        check_batch_sizes(self.tcfg, len(train_set), train_split)
        self.num_classes = len(train_set.classes)
        check_plan(self.cfg, self.num_classes, self.device)  # shapes and memory, before the model
        self.model = self._build_model()
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        log.info(
            "Model: %d parameters, %d classes, device %s",
            self.num_parameters, self.num_classes, self.device,
        )  # fmt: skip
        if main:
            self.logger = instantiate(
                cfg.logger, output_dir=self.out, run_config=self.resolved, _recursive_=False
            )
        start = (0, 0)
        if self.ckpt is not None:
            self.model.load_state_dict(self.ckpt["model"])
            self.history = list(self.ckpt["history"])
            self.stage_results = dict(self.ckpt["stage_results"])
            self.step = int(self.ckpt.get("step", 0))
            start = (self.ckpt["stage_index"], self.ckpt["next_epoch"])
            if main:
                self.logger.load_state_dict(self.ckpt.get("logger"))
                self.logger.restore(self.history, self.step)
        self._fit_pooling()
        return start

    def _dataset(self, split: str, augment: bool) -> Split:
        """One split of the configured dataset, remembered for the skipped-image report."""
        ds = instantiate(self.cfg.dataset, split=split, augment=augment)
        self.built_datasets.append(ds)
        return ds

    def train_view(self) -> Split:
        """The training split with the evaluation transform."""
        return self._dataset(self.splits["train"][0], augment=False)

    def _build_model(self) -> BilinearModel:
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.cfg, self.num_classes)
        if self.env.enabled:  # a model without batch norm is returned as it is
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if self.tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
            model.channels_last = True
        if self.tcfg.compile:
            # In place, so state_dict keys (and checkpoints) stay those of the plain model.
            model.backbone.compile()
        return model

    def _fit_pooling(self) -> None:
        """Fits a pooling head that learns from data (the Fisher vector's GMM, a PCA) on the
        backbone maps of all training images, or of ``pooling.fit_images`` evenly spaced ones."""
        pooling = self.model.pooling
        if not getattr(pooling, "needs_fit", False):
            return
        ds = self.train_view()
        wanted = pooling.fit_images
        if wanted is not None and wanted < len(ds):
            # Evenly spaced: datasets list their images by class.
            ds = Subset(ds, np.linspace(0, len(ds) - 1, wanted).round().astype(int).tolist())
        bs = self.tcfg.eval_batch_size or self.tcfg[self.tcfg.stages[0]].batch_size
        loader = DataLoader(ds, batch_size=bs, num_workers=self.tcfg.num_workers)
        self.model.eval()

        def maps() -> Iterator[torch.Tensor]:
            # No context manager in here: fit() may stop the generator early, and a
            # suspended no_grad/autocast block would leak into the caller.
            for images, _ in loader:
                yield self.model.backbone(self.model.normalize_input(images.to(self.device)))

        with torch.no_grad(), autocast(self.device, self.precision):
            info = pooling.fit(maps())
        summary = {k: v for k, v in info.items() if k != "log_likelihood"}
        log.info("Fitted the pooling head on %d training images: %s", len(ds), summary)

    def _stage(self, index: int, name: str, resume: dict | None, start_epoch: int) -> None:
        """Trains one stage from ``start_epoch``, then evaluates its selected epoch once."""
        self.model.freeze_backbone(name != "finetune")
        inputs = stage_inputs(self, name)
        if getattr(self.model.classifier, "trains_on_cache", False):
            selection, epochs = fit_on_cache(self, index, name, inputs), 1
        else:
            stage = Stage(self, index, name, inputs, resume, start_epoch)
            epochs, selection = stage.fit(start_epoch), stage.selection
        if (self.ckdir / "best.pt").exists():
            self.model.load_state_dict(load_checkpoint(self.ckdir / "best.pt")["model"])
        result: dict[str, Any] = {"best_epoch": selection.epoch + 1, "epochs": epochs}
        for role in ("val", "test"):
            ds = getattr(inputs, role)
            meter = self.evaluate(inputs.net, inputs, role) if ds is not None and len(ds) else None
            result[f"{role}_acc"] = meter.accuracy() if meter else None
            result[f"{role}_mean_class_acc"] = meter.mean_class_accuracy() if meter else None
        self.stage_results[name] = result
        log.info("Stage %s done: %s", name, result)
        if self.env.is_main:
            # The next stage starts from these weights; a resume after this point skips ahead.
            save_checkpoint(self.state((index + 1, 0), Selection()), self.ckdir / "last.pt")
            if inputs.cache_folder is not None:
                # A cache inside the run directory has served its purpose: free the disk.
                shutil.rmtree(inputs.cache_folder, ignore_errors=True)
        D.barrier()

    def evaluate(self, net: nn.Module, inputs: StageInputs, role: str) -> ConfusionMeter:
        """``net`` on the stage's ``val`` or ``test`` split (each process takes every
        world_size-th image), reduced over the processes."""
        ds = getattr(inputs, role)
        loader = DataLoader(
            Subset(ds, range(self.env.rank, len(ds), self.env.world_size)),
            batch_size=max(1, inputs.eval_batch // self.env.world_size),
            num_workers=inputs.workers,
            pin_memory=self.device.type == "cuda",
        )
        meter = evaluate(
            net, loader, self.num_classes, self.device, precision=self.precision,
            flip=role == "test" and inputs.test_flip, max_batches=self.tcfg.limit_eval_batches,
            desc=role if self.progress else None,
        )  # fmt: skip
        return meter.all_reduce()

    def log_epoch(
        self,
        name: str,
        epoch: int,
        epochs: int,
        lr: float,
        stats: EpochStats,
        val: ConfusionMeter | None,
        seconds: float,
        extra: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        row = {
            "stage": name,
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": stats.loss,
            "train_acc": stats.acc,
            "val_acc": val.accuracy() if val else math.nan,
            "val_mean_class_acc": val.mean_class_accuracy() if val else math.nan,
            "seconds": round(seconds, 3),
            **(extra or {}),
        }
        self.history.append(row)
        log.info(
            "%s epoch %d/%d: loss %.4f, train acc %.2f, val acc %.2f",
            name, epoch + 1, epochs, stats.loss, stats.acc, row["val_acc"],
        )  # fmt: skip
        if self.env.is_main:
            self.logger.log_epoch(row, self.step)
        return row

    def state(
        self,
        cursor: tuple[int, int],
        selection: Selection,
        optimization: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A checkpoint: the weights, the stage's ``optimization`` and the run's progress,
        config and identity."""
        return {
            "model": self.model.state_dict(),
            **dict.fromkeys(("optimizer", "scheduler", "scaler", "ema")),
            **(optimization or {}),
            "stage_index": cursor[0],
            "next_epoch": cursor[1],
            "best_metric": selection.metric,
            "best_epoch": selection.epoch,
            "top_k": list(selection.top),
            "history": list(self.history),
            "stage_results": dict(self.stage_results),
            "step": self.step,
            "rng": rng_state(),
            "config": self.resolved,
            "classes": list(self.splits["train"][1].classes),
            "input_spec": dataclasses.asdict(self.model.input_spec),
            # What the logger needs to continue on resume (e.g. the wandb run id).
            "logger": self.logger.state_dict() if self.logger is not None else None,
            "run_id": self.run_id,
            "run_dir": str(self.out),
        }

    def _finish(self, seconds: float) -> dict[str, Any]:
        """Writes results.json (the final stage's accuracies) and closes the logger."""
        final = self.stage_results[self.tcfg.stages[-1]]
        mine = {p for ds in self.built_datasets for p in getattr(ds, "skipped", list)()}
        skipped = sorted(set().union(*D.all_gather_object(sorted(mine))))
        results = {
            **{k: final[k] for k in ("test_acc", "test_mean_class_acc", "val_acc")},
            "val_mean_class_acc": final["val_mean_class_acc"],
            "stages": self.stage_results,
            "num_classes": self.num_classes,
            "num_parameters": self.num_parameters,
            "dataset": self.cfg.dataset.get("name"),
            "world_size": self.env.world_size,
            "skipped_images": {"count": len(skipped), "first": skipped[:10]},
            "output_dir": str(self.out),
        }
        if self.env.is_main:
            tmp = self.out / "results.json.tmp"
            tmp.write_text(json.dumps(results, indent=2, allow_nan=True))
            os.replace(tmp, self.out / "results.json")
            self.logger.log_summary(results)
            self.logger.close()
        note = f"; {len(skipped)} unreadable images skipped, e.g. {skipped[0]}" if skipped else ""
        log.info(
            "Test accuracy %.2f%% (mean per class %.2f%%) in %.0f s%s; outputs in %s",
            results["test_acc"], results["test_mean_class_acc"], seconds, note, self.out,
        )  # fmt: skip
        return results
