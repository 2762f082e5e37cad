"""``train(cfg) -> results``: the two-stage training run behind ``train.py``.

A run trains the stages of ``trainer.stages`` in order (``linear``: backbone frozen,
only the head trains; ``finetune``: everything trains), selects each stage's best epoch
on the validation split, evaluates that model once on the test split, and writes
everything into its output directory::

    config.yaml             the resolved config
    train.log               the log
    metrics.csv             one row per stage and epoch
    results.json            final and per-stage accuracies
    curves.png              loss and accuracy per epoch
    splits/<split>.txt      the image lists of each split (datasets read from files)
    checkpoints/last.pt     everything needed to resume (written atomically)
    checkpoints/best.pt     the best-validation model of the current stage
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from bcnn.config import StageConfig, TrainConfig, instantiate, validate
from bcnn.engine import distributed as D
from bcnn.engine.cache import CachedViews, ViewAverage, build_cache
from bcnn.engine.checkpoint import (
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)
from bcnn.engine.loops import evaluate, train_one_epoch
from bcnn.engine.optim import build_optimizer, build_scheduler
from bcnn.models import BilinearModel, build_model
from bcnn.results.plots import plot_training_curves

log = logging.getLogger(__name__)

# Keys of the command line that win over a resumed checkpoint's config: they change
# where and how fast the run executes, not what it computes.
RUNTIME_KEYS = ("device", "num_workers", "progress")


def _output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ValueError(
        "output_dir is not set: run through train.py (Hydra picks the directory) or pass "
        "output_dir=<folder> when calling bcnn.engine.train directly"
    )


def _device(name: str, env: D.DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and env.enabled:
        return torch.device("cuda", env.local_rank)
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resumed_config(cfg: DictConfig, ckpt: dict[str, Any], path: Path) -> DictConfig:
    # Merged into the schema so the resumed config is typed exactly like a composed one.
    saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), ckpt["config"])
    with open_dict(saved):
        for key in RUNTIME_KEYS:
            saved.trainer[key] = cfg.trainer[key]
        saved.trainer.resume = str(path)
        saved.output_dir = str(path.parent.parent)
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
        ValueError: an invalid config value, naming the key.
        FileNotFoundError: a missing dataset file or resume checkpoint.
    """
    validate(cfg)
    ckpt = None
    if cfg.trainer.resume:
        path = resolve_checkpoint(cfg.trainer.resume)
        ckpt = load_checkpoint(path)
        cfg = _resumed_config(cfg, ckpt, path)
    env = D.init()
    for name in cfg.trainer.stages:
        if cfg.trainer[name].batch_size % env.world_size:
            raise ValueError(
                f"Invalid config value for 'trainer.{name}.batch_size': the global batch "
                f"{cfg.trainer[name].batch_size} must be divisible by the {env.world_size} "
                "processes"
            )
    # Every process writes into rank 0's directory (Hydra's ${now:...} may differ).
    output_dir = Path(D.broadcast_object(str(_output_dir(cfg))))
    file_log = None
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        file_log = _FileLog(output_dir)
    try:
        return _Run(cfg, output_dir, ckpt, env).run()
    finally:
        if file_log is not None:
            file_log.close()


class _Run:
    """State of one run; ``run()`` executes it from the start or from a checkpoint."""

    def __init__(
        self, cfg: DictConfig, output_dir: Path, ckpt: dict[str, Any] | None, env: D.DistEnv
    ) -> None:
        self.cfg = cfg
        self.out = output_dir
        self.ckpt = ckpt
        self.env = env
        self.tcfg = cfg.trainer
        self.device = _device(self.tcfg.device, env)
        self.precision = str(self.tcfg.precision)
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        self.history: list[dict[str, Any]] = []
        self.stage_results: dict[str, dict[str, Any]] = {}
        self.logger = None

    # ---- set-up ---------------------------------------------------------------------
    def _datasets(self) -> dict[str, Dataset]:
        val_fraction = float(self.cfg.dataset.get("val_fraction", 0.0) or 0.0)
        self.split_names = {"train": "train", "val": "val"} if val_fraction > 0 else {}
        self.split_names.setdefault("train", "trainval")
        self.split_names["test"] = "test"
        # Built before the model, without transforms: a missing or malformed dataset
        # fails here, before any weights are loaded.
        datasets = {
            role: instantiate(self.cfg.dataset, split=split, transform=None)
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

    def _recipe(self) -> dict[str, Any] | None:
        recipe = self.cfg.dataset.get("transform")
        return OmegaConf.to_container(recipe, resolve=True) if recipe is not None else None

    def _attach_transforms(
        self, datasets: dict[str, Dataset], model: BilinearModel, train_role: str = "train"
    ) -> None:
        # Workers hand over uint8 images (4x fewer bytes than float32); ``_prepare``
        # normalizes each batch on the device.
        from bcnn.data.transforms import build_transforms

        for role, ds in datasets.items():
            if hasattr(ds, "transform"):
                ds.transform = build_transforms(
                    self._recipe(), model.input_spec, train=role == train_role, normalize=False
                )

    def _prepare(self, datasets: dict[str, Dataset], model: BilinearModel):
        from bcnn.data.transforms import ToNormalizedFloat

        normalize = (
            ToNormalizedFloat(model.input_spec)
            if any(hasattr(ds, "transform") for ds in datasets.values())
            else None
        )
        channels_last = self.tcfg.channels_last

        def prepare(images: torch.Tensor) -> torch.Tensor:
            if normalize is not None:
                images = normalize(images)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            return images

        return prepare

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
        if self.tcfg.compile:
            # In place, so state_dict keys (and checkpoints) stay those of the plain model.
            model.backbone.compile()
        return model

    def _eval_loader(self, ds: Dataset, batch_size: int, workers: int | None = None) -> DataLoader:
        # Each process evaluates every world_size-th image: each image is counted once.
        shard = Subset(ds, range(self.env.rank, len(ds), self.env.world_size))
        workers = self.tcfg.num_workers if workers is None else workers
        return DataLoader(
            shard,
            batch_size=max(1, batch_size // self.env.world_size),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
        )

    def _evaluate(self, model: nn.Module, loader: DataLoader, flip: bool, desc: str, prepare):
        meter = evaluate(
            model, loader, self.num_classes, self.device, self.precision, flip=flip,
            limit=self.tcfg.limit_eval_batches, progress=self.tcfg.progress and self.env.is_main,
            desc=desc, prepare=prepare,
        )  # fmt: skip
        meter.matrix = D.all_reduce_sum(meter.matrix)
        return meter

    # ---- the feature cache -----------------------------------------------------------
    def _use_cache(self, model: BilinearModel) -> bool:
        mode = str(self.tcfg.cache_features).lower()
        if mode == "false":
            return False
        extra = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith(("backbone.", "classifier."))
        ]
        possible = not extra and hasattr(model.classifier, "in_features")
        possible = possible and not getattr(model.classifier, "wants_matrix", False)
        if mode == "true" and not possible:
            raise ValueError(
                "Invalid config value for 'trainer.cache_features': true needs a model whose "
                f"only trainable layer after the backbone is a linear classifier (found {extra}"
                "); use trainer.cache_features=auto or false"
            )
        return possible

    def _cached_sets(self, model, datasets, batch_size) -> dict[str, Dataset]:
        folder = Path(self.tcfg.cache_dir) if self.tcfg.cache_dir else self.out / "feature_cache"
        recipe = self._recipe()
        self._attach_transforms(datasets, model, train_role="none")  # all deterministic
        cached = {}
        for role, ds in datasets.items():
            if role == "val" and len(ds) == 0:
                continue
            if role == "train":
                # Descriptors of the deterministic (centre-crop) view; flips add a view.
                views = 2 if recipe and recipe.get("hflip", True) else 1
            else:
                views = 2 if role == "test" and self.tcfg.test_flip else 1
            identity = {
                "dataset": self.resolved["dataset"],
                "split": self.split_names[role],
                "precision": self.precision,
            }
            feats, labels = build_cache(
                model, ds, folder, identity, views, self.tcfg.cache_dtype, batch_size,
                self.device, self.precision, self.tcfg.num_workers, self.env,
                self._prepare(datasets, model),
            )  # fmt: skip
            cached[role] = CachedViews(feats, labels, train=role == "train")
        self._attach_transforms(datasets, model)  # restore the training transform
        return cached

    # ---- checkpoints ------------------------------------------------------------------
    def _state(self, model, optimizer, scheduler, scaler, cursor, best, best_epoch) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "stage_index": cursor[0],
            "next_epoch": cursor[1],
            "best_metric": best,
            "best_epoch": best_epoch,
            "history": list(self.history),
            "stage_results": dict(self.stage_results),
            "rng": rng_state(),
            "config": self.resolved,
        }

    # ---- the run ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, tcfg, main = self.cfg, self.tcfg, self.env.is_main
        if main:
            OmegaConf.save(self.resolved, self.out / "config.yaml")
        _seed_everything(cfg.seed)
        datasets = self._datasets()
        self.num_classes = num_classes = len(datasets["train"].classes)
        model = self._build_model(num_classes)
        self._attach_transforms(datasets, model)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("Model: %d parameters, %d classes, device %s", n_params, num_classes, self.device)
        if main:
            self.logger = instantiate(
                cfg.logger, output_dir=self.out, run_config=self.resolved, _recursive_=False
            )
        start_stage, start_epoch = 0, 0
        if self.ckpt is not None:
            model.load_state_dict(self.ckpt["model"])
            self.history = list(self.ckpt["history"])
            self.stage_results = dict(self.ckpt["stage_results"])
            start_stage, start_epoch = self.ckpt["stage_index"], self.ckpt["next_epoch"]
            if main:
                self.logger.restore(self.history)
        t_start = time.time()
        for index, name in enumerate(tcfg.stages):
            if index < start_stage:
                continue
            stage: StageConfig = OmegaConf.to_object(tcfg[name])
            resume = self.ckpt if (index == start_stage and self.ckpt is not None) else None
            first = start_epoch if resume is not None else 0
            self._run_stage(index, name, stage, model, datasets, resume, first)
        final = self.stage_results[tcfg.stages[-1]]
        results = {
            "test_acc": final["test_acc"],
            "test_mean_class_acc": final["test_mean_class_acc"],
            "val_acc": final["val_acc"],
            "val_mean_class_acc": final["val_mean_class_acc"],
            "stages": self.stage_results,
            "num_classes": num_classes,
            "num_parameters": n_params,
            "dataset": cfg.dataset.get("name"),
            "world_size": self.env.world_size,
            "output_dir": str(self.out),
        }
        if main:
            tmp = self.out / "results.json.tmp"
            tmp.write_text(json.dumps(results, indent=2, allow_nan=True))
            os.replace(tmp, self.out / "results.json")
            plot_training_curves(self.out / "metrics.csv", self.out / "curves.png")
            self.logger.log_summary(results)
            self.logger.close()
        log.info(
            "Test accuracy %.2f%% (mean per class %.2f%%) in %.0f s; outputs in %s",
            results["test_acc"], results["test_mean_class_acc"], time.time() - t_start, self.out,
        )  # fmt: skip
        return results

    def _run_stage(self, index, name, stage, model, datasets, resume, start_epoch) -> None:
        tcfg, env, ckdir = self.tcfg, self.env, self.out / "checkpoints"
        finetune = name == "finetune"
        model.backbone.requires_grad_(finetune)
        eval_bs = tcfg.eval_batch_size or stage.batch_size
        cached = not finetune and self._use_cache(model)
        if cached:
            sets = self._cached_sets(model, datasets, eval_bs)
            net: nn.Module = ViewAverage(model.classifier)
            workers, test_flip = 0, False  # memory maps are read in-process; views hold flips
            prepare = None
        else:
            sets, net, workers, test_flip = datasets, model, tcfg.num_workers, tcfg.test_flip
            prepare = self._prepare(datasets, model)
        train_net = net
        if env.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_net = DistributedDataParallel(net, device_ids=ids)
        optimizer = build_optimizer(model, stage, train_backbone=finetune)
        scheduler = build_scheduler(optimizer, stage)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        best, best_epoch = -math.inf, -1
        if resume is not None:
            if start_epoch > 0:
                optimizer.load_state_dict(resume["optimizer"])
                scheduler.load_state_dict(resume["scheduler"])
                scaler.load_state_dict(resume["scaler"])
                best, best_epoch = resume["best_metric"], resume["best_epoch"]
            set_rng_state(resume["rng"])
        # Every process shuffles with the same seed and takes its share of each global
        # batch, so N processes see exactly the batches one process would.
        sampler = DistributedSampler(
            sets["train"], num_replicas=env.world_size, rank=env.rank, shuffle=True,
            seed=self.cfg.seed * 1_000_003 + index,
        )  # fmt: skip
        train_loader = DataLoader(
            sets["train"],
            batch_size=stage.batch_size // env.world_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
        )
        has_val = "val" in sets and len(sets["val"]) > 0
        val_loader = self._eval_loader(sets["val"], eval_bs, workers) if has_val else None
        progress = tcfg.progress and env.is_main
        for epoch in range(start_epoch, stage.epochs):
            t0 = time.time()
            sampler.set_epoch(epoch)
            lr = optimizer.param_groups[-1]["lr"]
            stats = train_one_epoch(
                train_net, train_loader, optimizer, scaler, self.device, self.precision,
                grad_accum=stage.grad_accum, grad_clip=stage.grad_clip,
                frozen_backbone=not finetune and not cached, limit=tcfg.limit_train_batches,
                progress=progress, desc=f"{name} {epoch + 1}/{stage.epochs}", prepare=prepare,
            )  # fmt: skip
            sums = D.all_reduce_sum(
                torch.tensor([stats.loss_sum, stats.correct, stats.seen], dtype=torch.float64)
            )
            stats.loss_sum, stats.correct, stats.seen = (
                sums[0].item(),
                sums[1].item(),
                sums[2].item(),
            )
            scheduler.step()
            val = self._evaluate(net, val_loader, False, "val", prepare) if has_val else None
            row = {
                "stage": name,
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": stats.loss,
                "train_acc": stats.acc,
                "val_acc": val.accuracy() if val else math.nan,
                "val_mean_class_acc": val.mean_class_accuracy() if val else math.nan,
                "seconds": round(time.time() - t0, 3),
            }
            self.history.append(row)
            log.info(
                "%s epoch %d/%d: loss %.4f, train acc %.2f, val acc %.2f",
                name, epoch + 1, stage.epochs, stats.loss, stats.acc, row["val_acc"],
            )  # fmt: skip
            # Without a validation split the latest epoch is the selected one.
            metric = row["val_acc"] if has_val else float(epoch)
            improved = metric > best
            if improved:
                best, best_epoch = metric, epoch
            if env.is_main:
                self.logger.log_epoch(row)
                state = self._state(
                    model, optimizer, scheduler, scaler, (index, epoch + 1), best, best_epoch
                )
                if improved:
                    save_atomic(state, ckdir / "best.pt")
                save_atomic(state, ckdir / "last.pt")
            D.barrier()

        # The selected (best-validation) weights are evaluated once on the test split.
        if best_epoch != stage.epochs - 1 and (ckdir / "best.pt").exists():
            model.load_state_dict(load_checkpoint(ckdir / "best.pt")["model"])
        result: dict[str, Any] = {"best_epoch": best_epoch + 1, "epochs": stage.epochs}
        if has_val:
            val = self._evaluate(net, val_loader, False, "val", prepare)
            result.update(val_acc=val.accuracy(), val_mean_class_acc=val.mean_class_accuracy())
        else:
            result.update(val_acc=None, val_mean_class_acc=None)
        test = self._evaluate(
            net, self._eval_loader(sets["test"], eval_bs, workers), test_flip, "test", prepare
        )
        result.update(test_acc=test.accuracy(), test_mean_class_acc=test.mean_class_accuracy())
        self.stage_results[name] = result
        log.info("Stage %s done: %s", name, result)
        if env.is_main:
            # The next stage starts from these weights; a resume after this point skips ahead.
            save_atomic(
                self._state(model, None, None, None, (index + 1, 0), -math.inf, -1),
                ckdir / "last.pt",
            )
            if cached and not tcfg.cache_dir:
                # A cache inside the run directory has served its purpose: free the disk.
                shutil.rmtree(self.out / "feature_cache", ignore_errors=True)
        D.barrier()
