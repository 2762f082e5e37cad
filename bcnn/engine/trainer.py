"""``train(cfg) -> results``: the two-stage training run behind ``train.py``.

A run trains the stages of ``trainer.stages`` in order (``linear``: backbone frozen,
only the head trains; ``finetune``: everything trains), selects each stage's best epoch
on the validation split, evaluates that model once on the test split, and writes
everything into its output directory::

    config.yaml             the resolved config
    train.log               the log
    metrics.csv             one row per stage and epoch
    results.json            final and per-stage accuracies
    curves.png              loss and accuracy per epoch (drawn by the logger)
    splits/<split>.txt      the image lists of each split (datasets read from files)
    checkpoints/last.pt     everything needed to resume (written atomically; the one
                            before is kept as last.prev.pt)
    checkpoints/best.pt     the best-validation model of the current stage

The parts: datasets are built once, with their final uint8 transforms; the model
normalizes its own input and owns freezing; a stage gets its inputs (live images
through the model, or cached descriptors through the classifier) from
``_stage_inputs``, runs its epochs in ``_run_stage`` and picks its epoch and tests it in
``_finish_stage``.

Failure is loud and leaves the run directory usable: a config error stops the run before
any data is read (``bcnn.config.validate``); a fresh run refuses a directory that holds
another run (``claim_run_dir``); a loss or weights that stop being finite raise
``DivergenceError`` naming the stage, epoch and step and the settings that likely caused
it, with the last good checkpoint kept and no ``results.json`` written.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from bcnn.config import StageConfig, instantiate, schema, validate
from bcnn.engine import distributed as D
from bcnn.engine import placement
from bcnn.engine.cache import CachedViews, ViewAverage, build_cache
from bcnn.engine.checkpoint import (
    link_checkpoint,
    load_checkpoint,
    load_resumable,
    resolve_checkpoint,
    rng_state,
    save_atomic,
    save_checkpoint,
    set_rng_state,
)
from bcnn.engine.loops import EpochStats, autocast, evaluate, train_one_epoch
from bcnn.engine.metrics import ConfusionMeter
from bcnn.errors import ConfigError, DivergenceError
from bcnn.models import BilinearModel, build_model
from bcnn.models.plan import check_plan

log = logging.getLogger(__name__)

# Files whose presence means a directory already holds a run.
RUN_FILES = ("config.yaml", "metrics.csv", "results.json", "checkpoints")


class RunDirectoryError(FileExistsError):
    """A fresh run was pointed at a directory that holds another run."""


def run_dir_in_use(output_dir: str | Path) -> str | None:
    """Why a fresh run may not use ``output_dir`` (it holds another run), or None.

    Also for launchers that want to refuse before Hydra writes its ``.hydra`` folder.
    """
    output_dir = Path(output_dir)
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not found:
        return None
    return (
        f"{output_dir} already holds a run ({', '.join(found)}): resume it with "
        f"trainer.resume={output_dir}, or choose another directory (hydra.run.dir=<new "
        "folder>, or paths.output_dir=<new folder> when calling bcnn.engine.train)."
    )


def claim_run_dir(output_dir: Path) -> str | None:
    """Claims ``output_dir`` for a fresh run; returns why not when it holds another run.

    The claim is the exclusive creation of ``config.yaml``: of two runs started at once
    into one directory, exactly one gets it.
    """
    problem = run_dir_in_use(output_dir)
    if problem is None:
        try:
            with (output_dir / "config.yaml").open("x"):
                return None
        except FileExistsError:
            problem = run_dir_in_use(output_dir)
    return problem


# Keys of the command line that win over a resumed checkpoint's config: they change
# where and how fast the run executes, not what it computes.
RUNTIME_KEYS = ("device", "num_workers", "progress")


def _device(name: str, env: D.DistEnv) -> torch.device:
    device = placement.resolve_device(name)
    if device.type == "cuda" and env.enabled:
        return torch.device("cuda", env.local_rank)
    return device


def check_batch_sizes(trainer: DictConfig, train_size: int, split: str = "train") -> None:
    """A stage's batch larger than the training split is a config error, known once the
    dataset is (before the model is built or any image is read).

    A limited run (``trainer.limit_train_batches``, ``debug=smoke``) only checks that a
    setting runs: on a small dataset it trains on the whole split per step, with a
    warning.

    Raises:
        ConfigError: naming ``trainer.<stage>.batch_size``, its value and the split's size.
    """
    for name in trainer.stages:
        size = trainer[name].batch_size
        if size <= train_size:
            continue
        problem = (
            f"{size} exceeds the {train_size} images of the training split ({split}); "
            f"use at most {train_size}"
        )
        if trainer.limit_train_batches is None:
            raise ConfigError(f"trainer.{name}.batch_size", problem)
        log.warning("trainer.%s.batch_size=%s: limited run, one batch per epoch", name, problem)


def _finite_parameters(net: nn.Module) -> bool:
    """Whether every parameter is finite (one host synchronisation)."""
    flags = [p.detach().isfinite().all() for p in net.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resumed_config(cfg: DictConfig, ckpt: dict[str, Any], path: Path) -> DictConfig:
    # Merged into the schema so the resumed config is typed exactly like a composed one.
    saved = OmegaConf.merge(schema(), ckpt["config"])
    with open_dict(saved):
        for key in RUNTIME_KEYS:
            saved.trainer[key] = cfg.trainer[key]
        saved.trainer.resume = str(path)
        saved.paths.output_dir = str(path.parent.parent)
    log.info("Resuming from %s with the config it was started with", path)
    return saved


class _FileLog:
    """Adds ``train.log`` in the run directory when Hydra does not already write it."""

    def __init__(self, output_dir: Path) -> None:
        self.handler: logging.Handler | None = None
        if not HydraConfig.initialized():
            self.handler = logging.FileHandler(output_dir / "train.log")
            self.handler.setFormatter(
                logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
            )
            logging.getLogger("bcnn").addHandler(self.handler)
            logging.getLogger("bcnn").setLevel(logging.INFO)

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger("bcnn").removeHandler(self.handler)
            self.handler.close()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Runs a complete training job described by a composed config.

    Args:
        cfg: The composed config (see ``configs/train.yaml``); validated first.

    Returns:
        The content of ``results.json``: ``test_acc``, ``test_mean_class_acc``,
        ``val_acc``, ``val_mean_class_acc`` (percent, of the final model), ``stages``
        (the same keys per stage) and ``output_dir``.

    Raises:
        ConfigError: an invalid config value (a ``ValueError``), naming the key.
        FileNotFoundError: a missing dataset file or resume checkpoint.
        CheckpointError: no usable checkpoint to resume from (a ``ValueError``).
        RunDirectoryError: a fresh run pointed at another run's directory.
        DivergenceError: the loss stopped being finite (no ``results.json`` is written).
    """
    validate(cfg, files=True)
    ckpt = None
    if cfg.trainer.resume:
        path, ckpt = load_resumable(resolve_checkpoint(cfg.trainer.resume))
        cfg = _resumed_config(cfg, ckpt, path)
        validate(cfg, files=True)
    env = D.init()
    for name in cfg.trainer.stages:
        if cfg.trainer[name].batch_size % env.world_size:
            raise ConfigError(
                f"trainer.{name}.batch_size",
                f"the global batch {cfg.trainer[name].batch_size} must be divisible by the "
                f"{env.world_size} processes",
            )
    # Every process writes into rank 0's directory (Hydra's ${now:...} may differ).
    chosen = placement.output_dir(cfg, "train.py", "bcnn.engine.train")
    output_dir = Path(D.broadcast_object(str(chosen)))
    refused = None
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        refused = None if ckpt is not None else claim_run_dir(output_dir)
    refused = D.broadcast_object(refused)
    if refused:
        raise RunDirectoryError(refused)
    file_log = None
    if env.is_main:
        file_log = _FileLog(output_dir)
    try:
        return _Run(cfg, output_dir, ckpt, env).run()
    except BaseException:
        # A fresh run that failed before writing anything to resume from or to read (a
        # missing dataset, a batch larger than the split) leaves the directory reusable.
        if (
            env.is_main
            and ckpt is None
            and not any((output_dir / n).exists() for n in RUN_FILES[1:])
        ):
            (output_dir / "config.yaml").unlink(missing_ok=True)
        raise
    finally:
        if file_log is not None:
            file_log.close()


@dataclass
class _StageInputs:
    """What a stage trains and evaluates: live images through the model, or cached
    descriptors through the classifier alone."""

    net: nn.Module
    train: Dataset
    val: Dataset | None
    test: Dataset
    workers: int
    test_flip: bool
    cache_folder: Path | None = None


@dataclass
class _Selection:
    """The best epoch so far of a stage (by validation accuracy, else the latest)."""

    metric: float = -math.inf
    epoch: int = -1

    def offer(self, metric: float, epoch: int) -> bool:
        """Records ``epoch`` if its ``metric`` beats the best so far; returns whether it did."""
        if metric > self.metric:
            self.metric, self.epoch = metric, epoch
            return True
        return False


class _Run:
    """State of one run; ``run()`` executes it from the start or from a checkpoint."""

    def __init__(
        self, cfg: DictConfig, output_dir: Path, ckpt: dict[str, Any] | None, env: D.DistEnv
    ) -> None:
        self.cfg = cfg
        self.out = output_dir
        self.ckdir = output_dir / "checkpoints"
        self.ckpt = ckpt
        self.resumed_from = Path(cfg.trainer.resume) if ckpt is not None else None
        self.env = env
        self.tcfg = cfg.trainer
        self.device = _device(self.tcfg.device, env)
        self.precision = str(self.tcfg.precision)
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        self.history: list[dict[str, Any]] = []
        self.stage_results: dict[str, dict[str, Any]] = {}
        self.logger: Any = None
        self.built_datasets: list[Dataset] = []

    # ---- set-up ---------------------------------------------------------------------
    def _datasets(self) -> dict[str, Dataset]:
        """Every split, built once with its final transform (random crops for training)."""
        val_fraction = float(self.cfg.dataset.get("val_fraction", 0.0) or 0.0)
        self.split_names = {"train": "train", "val": "val"} if val_fraction > 0 else {}
        self.split_names.setdefault("train", "trainval")
        self.split_names["test"] = "test"
        # Built before the model: a missing or malformed dataset fails here, before any
        # weights are loaded.
        datasets = {
            role: self._dataset(split, augment=role == "train")
            for role, split in self.split_names.items()
        }
        for role, ds in datasets.items():
            split = self.split_names[role]
            log.info("%s split (%s): %d images", role, split, len(ds))
            if len(ds) == 0 and role != "val":
                raise ValueError(f"dataset split '{split}' is empty ({self.cfg.dataset})")
            if hasattr(ds, "write_samples") and self.env.is_main:
                ds.write_samples(self.out / "splits" / f"{split}.txt")
        return datasets

    def _dataset(self, split: str, augment: bool) -> Dataset:
        """One split of the configured dataset, remembered for the skipped-image report."""
        ds = instantiate(self.cfg.dataset, split=split, augment=augment)
        self.built_datasets.append(ds)
        return ds

    def _skipped_images(self) -> list[str]:
        """Images skipped (``on_bad_image=skip``) by any dataset, worker or process."""
        mine = {p for ds in self.built_datasets for p in getattr(ds, "skipped", list)()}
        return sorted(set().union(*D.all_gather_object(sorted(mine))))

    def _build_model(self, num_classes: int) -> BilinearModel:
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.cfg, num_classes)
        if self.env.enabled and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        ):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if self.tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
            model.channels_last = True
        if self.tcfg.compile:
            # In place, so state_dict keys (and checkpoints) stay those of the plain model.
            model.backbone.compile()
        return model

    def _loader(self, ds: Dataset, batch_size: int, workers: int) -> DataLoader:
        """An evaluation loader: each process evaluates every world_size-th image."""
        shard = Subset(ds, range(self.env.rank, len(ds), self.env.world_size))
        return DataLoader(
            shard,
            batch_size=max(1, batch_size // self.env.world_size),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
        )

    def _evaluate(self, inputs: _StageInputs, ds: Dataset, batch_size: int, flip: bool, desc: str):
        meter = evaluate(
            inputs.net,
            self._loader(ds, batch_size, inputs.workers),
            self.num_classes,
            self.device,
            precision=self.precision,
            flip=flip,
            max_batches=self.tcfg.limit_eval_batches,
            desc=desc if self.tcfg.progress and self.env.is_main else None,
        )
        return meter.all_reduce()

    # ---- a stage's inputs -------------------------------------------------------------
    def _cacheable(self, model: BilinearModel) -> bool:
        mode = str(self.tcfg.cache_features).lower()
        if mode == "false":
            return False
        extra = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith(("backbone.", "classifier."))
        ]
        if mode == "true" and extra:
            raise ValueError(
                "Invalid config value for 'trainer.cache_features': true needs a model whose "
                f"only trainable layer after the backbone is the classifier (found {extra}); "
                "use trainer.cache_features=auto or false"
            )
        return not extra

    def _stage_inputs(self, finetune: bool, batch_size: int, train_batch: int) -> _StageInputs:
        """What a stage trains and evaluates on: the images, or a feature cache of them.

        The cache serves a stage that trains only the classifier on a frozen backbone
        (``trainer.cache_features``); its network is then the classifier on the views.

        Args:
            finetune: The stage trains the backbone (never cached).
            batch_size: The evaluation batch (also the batch that builds the cache).
            train_batch: The stage's training batch (what a limited run reads per step).
        """
        live = _StageInputs(
            net=self.model,
            train=self.datasets["train"],
            val=self.datasets.get("val"),
            test=self.datasets["test"],
            workers=self.tcfg.num_workers,
            test_flip=self.tcfg.test_flip,
        )
        if finetune or not self._cacheable(self.model):
            return live
        folder = Path(self.tcfg.cache_dir) if self.tcfg.cache_dir else self.out / "feature_cache"
        cached = {}
        for role, ds in self.datasets.items():
            if role == "val" and len(ds) == 0:
                continue
            cached[role] = self._cached_split(role, ds, folder, batch_size, train_batch)
        # Memory maps are read in-process; the cached views already hold the flips.
        return _StageInputs(
            net=ViewAverage(self.model.classifier),
            train=cached["train"],
            val=cached.get("val"),
            test=cached["test"],
            workers=0,
            test_flip=False,
            cache_folder=None if self.tcfg.cache_dir else folder,
        )

    def _cached_split(
        self, role: str, ds: Dataset, folder: Path, batch_size: int, train_batch: int
    ) -> CachedViews:
        """The descriptors of one split (``train``, ``val`` or ``test``), cached in ``folder``.

        Args:
            role: The split's role.
            ds: The split's dataset as the stage reads it.
            folder: Parent folder of the caches.
            batch_size: The evaluation batch (also images per forward pass here).
            train_batch: The stage's training batch.
        """
        if role == "train":
            # Descriptors of the deterministic (centre-crop) view of the training
            # images, built for the purpose; flips add a view.
            ds = self._dataset(self.split_names["train"], augment=False)
            recipe = self.cfg.dataset.get("transform")
            views = 2 if recipe and recipe.get("hflip", True) else 1
        else:
            views = 2 if role == "test" and self.tcfg.test_flip else 1
        identity = {
            "dataset": self.resolved["dataset"],
            "split": self.split_names[role],
            "precision": self.precision,
        }
        # A limited run (trainer.limit_*_batches, debug=smoke) reads only the first
        # batches: cache only those images.
        if role == "train":
            limit, size = self.tcfg.limit_train_batches, train_batch
        else:
            limit, size = self.tcfg.limit_eval_batches, batch_size
        if limit is not None and limit * size < len(ds):
            ds = Subset(ds, range(limit * size))
            identity["images"] = len(ds)
        feats, labels = build_cache(
            self.model,
            ds,
            folder,
            identity,
            views=views,
            dtype=self.tcfg.cache_dtype,
            batch_size=batch_size,
            device=self.device,
            precision=self.precision,
            num_workers=self.tcfg.num_workers,
            env=self.env,
            progress=self._progress,
        )
        shape = self.model.descriptor_shape.dims
        return CachedViews(feats, labels, train=role == "train", shape=shape)

    # ---- checkpoints ------------------------------------------------------------------
    def _state(
        self,
        cursor: tuple[int, int],
        selection: _Selection,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "stage_index": cursor[0],
            "next_epoch": cursor[1],
            "best_metric": selection.metric,
            "best_epoch": selection.epoch,
            "history": list(self.history),
            "stage_results": dict(self.stage_results),
            "rng": rng_state(),
            "config": self.resolved,
            "classes": list(self.datasets["train"].classes),
            "input_spec": dataclasses.asdict(self.model.input_spec),
            # What the logger needs to continue on resume (e.g. the wandb run id).
            "logger": self.logger.state_dict() if self.logger is not None else None,
        }

    # ---- the run ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start_stage, start_epoch = self._set_up()
        t_start = time.time()
        for index, name in enumerate(self.tcfg.stages):
            if index >= start_stage:
                resume = self.ckpt if index == start_stage else None
                self._run_stage(index, name, resume, start_epoch if resume else 0)
        return self._finish(time.time() - t_start)

    def _set_up(self) -> tuple[int, int]:
        """Datasets, model, logger and the resumed state; returns where to start."""
        cfg, main = self.cfg, self.env.is_main
        if main:
            OmegaConf.save(self.resolved, self.out / "config.yaml")
        _seed_everything(cfg.seed)
        self.datasets = self._datasets()
        check_batch_sizes(self.tcfg, len(self.datasets["train"]), self.split_names["train"])
        self.num_classes = len(self.datasets["train"].classes)
        check_plan(cfg, self.num_classes, self.device)  # shapes and memory, before the model
        self.model = self._build_model(self.num_classes)
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
            start = (self.ckpt["stage_index"], self.ckpt["next_epoch"])
            if main:
                self.logger.load_state_dict(self.ckpt.get("logger"))
                self.logger.restore(self.history)
        self._fit_pooling()
        return start

    def _finish(self, seconds: float) -> dict[str, Any]:
        """Writes results.json (the final stage's accuracies) and closes the logger."""
        final = self.stage_results[self.tcfg.stages[-1]]
        skipped = self._skipped_images()
        results = {
            "test_acc": final["test_acc"],
            "test_mean_class_acc": final["test_mean_class_acc"],
            "val_acc": final["val_acc"],
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

    def _fit_pooling(self) -> None:
        """Fits a pooling head that learns from data before any training (the Fisher
        vector's GMM, a PCA projection) on backbone maps of training images: all of them, or
        ``pooling.fit_images`` evenly spaced ones, in a fixed order."""
        pooling = self.model.pooling
        if not getattr(pooling, "needs_fit", False):
            return
        ds = self._dataset(self.split_names["train"], augment=False)
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

    def _run_stage(self, index: int, name: str, resume: dict | None, start_epoch: int) -> None:
        stage: StageConfig = OmegaConf.to_object(self.tcfg[name])
        finetune = name == "finetune"
        self.model.freeze_backbone(not finetune)
        eval_bs = self.tcfg.eval_batch_size or stage.batch_size
        inputs = self._stage_inputs(finetune, eval_bs, stage.batch_size)
        if getattr(self.model.classifier, "trains_on_cache", False):
            return self._fit_classifier(index, name, stage, inputs, eval_bs)
        optimizer, scheduler, scaler, selection = self._optimization(
            name, stage, resume, start_epoch
        )
        best = self.ckdir / "best.pt"
        if resume is not None and selection.epoch == start_epoch - 1 and not best.exists():
            # Killed between writing last.pt and best.pt: the resumed checkpoint is the best.
            if self.env.is_main and self.resumed_from is not None:
                link_checkpoint(self.resumed_from, best)
            D.barrier()
        net, sampler, loader = self._train_loader(inputs, stage, index)
        has_val = inputs.val is not None and len(inputs.val) > 0
        for epoch in range(start_epoch, stage.epochs):
            t0, lr = time.time(), optimizer.param_groups[-1]["lr"]
            sampler.set_epoch(epoch)
            stats = train_one_epoch(
                net, loader, optimizer, self.device, scaler=scaler, precision=self.precision,
                grad_accum=stage.grad_accum, grad_clip=stage.grad_clip,
                max_batches=self.tcfg.limit_train_batches,
                desc=f"{name} {epoch + 1}/{stage.epochs}" if self._progress else None,
            ).all_reduce()  # fmt: skip
            if stats.diverged or not _finite_parameters(inputs.net):
                raise DivergenceError(self._divergence(name, epoch, stage, stats))
            val = self._evaluate(inputs, inputs.val, eval_bs, False, "val") if has_val else None
            row = self._log_epoch(name, epoch, stage.epochs, lr, stats, val, time.time() - t0)
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(row["val_acc"] if has_val else stats.acc)
            else:
                scheduler.step()
            # Without a validation split the latest epoch is the selected one.
            improved = selection.offer(row["val_acc"] if has_val else float(epoch), epoch)
            if self.env.is_main:
                state = self._state((index, epoch + 1), selection, optimizer, scheduler, scaler)
                # last.pt first: a crash between the two writes leaves a resumable run.
                save_checkpoint(state, self.ckdir / "last.pt")
                if improved:
                    link_checkpoint(self.ckdir / "last.pt", self.ckdir / "best.pt")
            D.barrier()
        self._finish_stage(index, name, stage, inputs, selection, eval_bs)

    def _divergence(self, name: str, epoch: int, stage: StageConfig, stats: EpochStats) -> str:
        """Where the run diverged and which settings likely caused it."""
        where = (
            f"step {stats.first_nonfinite_step + 1}"
            if stats.first_nonfinite_step is not None
            else "a step of another process"
            if stats.diverged
            else "its end (the weights are no longer finite)"
        )
        lrs = f"trainer.{name}.lr={stage.lr}"
        if name == "finetune":
            lrs += f", trainer.finetune.backbone_lr={stage.backbone_lr}"
        causes = [f"a learning rate too high ({lrs}; or set trainer.{name}.grad_clip)"]
        matrix = [
            f"normalization.{step}.{key}={node[key]}"
            for step, node in self.cfg.normalization.items()
            if isinstance(node, DictConfig) and ("iters" in node or "eps_mode" in node)
            for key in ("eps", "iters")
            if key in node
        ]
        if matrix:
            causes.append(f"a matrix-function setting ({', '.join(matrix)})")
        if str(self.cfg.pooling.get("_target_", "")).startswith("bcnn.models.pooling.Democratic"):
            causes.append(
                f"democratic pooling (pooling.tau={self.cfg.pooling.tau}, "
                f"pooling.gamma={self.cfg.pooling.gamma}, pooling.iters={self.cfg.pooling.iters})"
            )
        if self.precision == "fp16":
            causes.append("an fp16 overflow in the forward pass (try trainer.precision=bf16)")
        last = self.ckdir / "last.pt"
        kept = (
            f"The last good checkpoint is kept: {last}."
            if last.exists()
            else "No epoch had finished, so there is no checkpoint."
        )
        return (
            f"Training diverged: the loss of the {name} stage is not finite at epoch "
            f"{epoch + 1}/{stage.epochs}, {where}. Likely causes: {'; '.join(causes)}. "
            f"{kept} No results.json was written."
        )

    def _optimization(
        self, name: str, stage: StageConfig, resume: dict | None, start_epoch: int
    ) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler, _Selection]:
        """The stage's optimizer, schedule, loss scaler and epoch selection (resumed)."""
        finetune = name == "finetune"
        groups = self.model.param_groups(stage.lr, stage.backbone_lr if finetune else None)
        optimizer = instantiate(self.tcfg[name].optimizer)(groups, lr=stage.lr)
        scheduler = instantiate(self.tcfg[name].scheduler)(optimizer)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        selection = _Selection()
        if resume is not None:
            if start_epoch > 0:
                optimizer.load_state_dict(resume["optimizer"])
                scheduler.load_state_dict(resume["scheduler"])
                scaler.load_state_dict(resume["scaler"])
                selection = _Selection(resume["best_metric"], resume["best_epoch"])
            set_rng_state(resume["rng"])
        return optimizer, scheduler, scaler, selection

    def _train_loader(
        self, inputs: _StageInputs, stage: StageConfig, index: int
    ) -> tuple[nn.Module, DistributedSampler, DataLoader]:
        """The network to train (DDP-wrapped when distributed), its sampler and loader."""
        net = inputs.net
        if self.env.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DistributedDataParallel(inputs.net, device_ids=ids)
        # Every process shuffles with the same seed and takes its share of each global
        # batch, so N processes see exactly the batches one process would.
        sampler = DistributedSampler(
            inputs.train, num_replicas=self.env.world_size, rank=self.env.rank, shuffle=True,
            seed=self.cfg.seed * 1_000_003 + index,
        )  # fmt: skip
        loader = DataLoader(
            inputs.train,
            batch_size=stage.batch_size // self.env.world_size,
            sampler=sampler,
            num_workers=inputs.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=inputs.workers > 0,
        )
        return net, sampler, loader

    def _fit_classifier(
        self, index: int, name: str, stage: StageConfig, inputs: _StageInputs, eval_bs: int
    ) -> None:
        """A classifier trained on the cached descriptors in one go (SVMs), as one epoch."""
        if not isinstance(inputs.train, CachedViews):
            raise ValueError(
                f"classifier={type(self.model.classifier).__name__} trains on cached "
                "descriptors: it needs the feature cache (trainer.cache_features=auto or true) "
                "and a model whose only trainable layer after the backbone is the classifier"
            )
        t0 = time.time()
        info = self.model.classifier.fit(inputs.train.features, inputs.train.labels)
        # One row for the whole fit: the objective per training view, training accuracy.
        n = int(np.prod(inputs.train.features.shape[:2]))
        stats = EpochStats(info["objective"], round(info["train_accuracy"] * n), n)
        val = None
        if inputs.val is not None and len(inputs.val) > 0:
            val = self._evaluate(inputs, inputs.val, eval_bs, False, "val")
        row = self._log_epoch(name, 0, 1, math.nan, stats, val, time.time() - t0)
        selection = _Selection(row["val_acc"] if val else 0.0, 0)
        if self.env.is_main:
            save_atomic(self._state((index, 1), selection), self.ckdir / "best.pt")
        stage_one_epoch = dataclasses.replace(stage, epochs=1)
        self._finish_stage(index, name, stage_one_epoch, inputs, selection, eval_bs)

    @property
    def _progress(self) -> bool:
        return bool(self.tcfg.progress) and self.env.is_main

    def _log_epoch(
        self,
        name: str,
        epoch: int,
        epochs: int,
        lr: float,
        stats: EpochStats,
        val: ConfusionMeter | None,
        seconds: float,
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
        }
        self.history.append(row)
        log.info(
            "%s epoch %d/%d: loss %.4f, train acc %.2f, val acc %.2f",
            name, epoch + 1, epochs, stats.loss, stats.acc, row["val_acc"],
        )  # fmt: skip
        if self.env.is_main:
            self.logger.log_epoch(row)
        return row

    def _finish_stage(
        self,
        index: int,
        name: str,
        stage: StageConfig,
        inputs: _StageInputs,
        selection: _Selection,
        eval_bs: int,
    ) -> None:
        """Loads the selected epoch's weights, evaluates them once, records the stage."""
        if selection.epoch != stage.epochs - 1 and (self.ckdir / "best.pt").exists():
            self.model.load_state_dict(load_checkpoint(self.ckdir / "best.pt")["model"])
        result: dict[str, Any] = {"best_epoch": selection.epoch + 1, "epochs": stage.epochs}
        result.update(val_acc=None, val_mean_class_acc=None)
        if inputs.val is not None and len(inputs.val) > 0:
            val = self._evaluate(inputs, inputs.val, eval_bs, False, "val")
            result.update(val_acc=val.accuracy(), val_mean_class_acc=val.mean_class_accuracy())
        test = self._evaluate(inputs, inputs.test, eval_bs, inputs.test_flip, "test")
        result.update(test_acc=test.accuracy(), test_mean_class_acc=test.mean_class_accuracy())
        self.stage_results[name] = result
        log.info("Stage %s done: %s", name, result)
        if self.env.is_main:
            # The next stage starts from these weights; a resume after this point skips ahead.
            save_checkpoint(self._state((index + 1, 0), _Selection()), self.ckdir / "last.pt")
            if inputs.cache_folder is not None:
                # A cache inside the run directory has served its purpose: free the disk.
                shutil.rmtree(inputs.cache_folder, ignore_errors=True)
        D.barrier()
