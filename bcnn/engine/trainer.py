"""``train(cfg) -> results``: the two-stage training run behind ``train.py``.

A run trains the stages of ``trainer.stages`` in order (``linear``: backbone frozen,
only the head trains; ``finetune``: everything trains), selects each stage's best epoch
on the validation split, evaluates that model once on the test split, and writes
everything into its output directory::

    config.yaml             the resolved config
    train.log               the log
    metrics.csv             one row per stage and epoch
    results.json            final and per-stage accuracies
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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, Dataset

from bcnn.config import StageConfig, TrainConfig, validate
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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    output_dir = _output_dir(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    file_log = _FileLog(output_dir)
    try:
        return _Run(cfg, output_dir, ckpt).run()
    finally:
        file_log.close()


class _Run:
    """State of one run; ``run()`` executes it from the start or from a checkpoint."""

    def __init__(self, cfg: DictConfig, output_dir: Path, ckpt: dict[str, Any] | None) -> None:
        self.cfg = cfg
        self.out = output_dir
        self.ckpt = ckpt
        self.tcfg = cfg.trainer
        self.device = _device(self.tcfg.device)
        self.precision = str(self.tcfg.precision)
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        self.history: list[dict[str, Any]] = []
        self.stage_results: dict[str, dict[str, Any]] = {}

    # ---- set-up ---------------------------------------------------------------------
    def _datasets(self) -> dict[str, Dataset]:
        val_fraction = float(self.cfg.dataset.get("val_fraction", 0.0) or 0.0)
        names = {"train": "train", "val": "val"} if val_fraction > 0 else {"train": "trainval"}
        names["test"] = "test"
        # Built before the model, without transforms: a missing or malformed dataset
        # fails here, before any weights are loaded.
        datasets = {
            role: instantiate(self.cfg.dataset, split=split, transform=None, _convert_="all")
            for role, split in names.items()
        }
        for role, ds in datasets.items():
            log.info("%s split (%s): %d images", role, names[role], len(ds))
            if len(ds) == 0 and role != "val":
                raise ValueError(f"dataset split '{names[role]}' is empty ({self.cfg.dataset})")
            if hasattr(ds, "write_samples"):
                ds.write_samples(self.out / "splits" / f"{names[role]}.txt")
        return datasets

    def _attach_transforms(self, datasets: dict[str, Dataset], model: BilinearModel) -> None:
        if not any(hasattr(ds, "transform") for ds in datasets.values()):
            return
        from bcnn.data.transforms import build_transforms

        recipe = self.cfg.dataset.get("transform")
        recipe = OmegaConf.to_container(recipe, resolve=True) if recipe is not None else None
        for role, ds in datasets.items():
            if hasattr(ds, "transform"):
                ds.transform = build_transforms(recipe, model.input_spec, train=role == "train")

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
        workers = self.tcfg.num_workers
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=gen,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            drop_last=False,
        )

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
        cfg, tcfg = self.cfg, self.tcfg
        OmegaConf.save(self.resolved, self.out / "config.yaml")
        _seed_everything(cfg.seed)
        datasets = self._datasets()
        num_classes = len(datasets["train"].classes)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, num_classes).to(self.device)
        self._attach_transforms(datasets, model)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("Model: %d parameters, %d classes, device %s", n_params, num_classes, self.device)
        logger = instantiate(
            cfg.logger, output_dir=self.out, run_config=self.resolved, _recursive_=False
        )
        start_stage, start_epoch = 0, 0
        if self.ckpt is not None:
            model.load_state_dict(self.ckpt["model"])
            self.history = list(self.ckpt["history"])
            self.stage_results = dict(self.ckpt["stage_results"])
            start_stage, start_epoch = self.ckpt["stage_index"], self.ckpt["next_epoch"]
            logger.restore(self.history)
        eval_bs = tcfg.eval_batch_size
        t_start = time.time()
        for index, name in enumerate(tcfg.stages):
            if index < start_stage:
                continue
            stage: StageConfig = OmegaConf.to_object(tcfg[name])
            resume = self.ckpt if (index == start_stage and self.ckpt is not None) else None
            self._run_stage(
                index,
                name,
                stage,
                model,
                datasets,
                num_classes,
                logger,
                resume,
                start_epoch if resume else 0,
                eval_bs or stage.batch_size,
            )
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
            "output_dir": str(self.out),
        }
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, allow_nan=True))
        os.replace(tmp, self.out / "results.json")
        logger.log_summary(results)
        logger.close()
        log.info(
            "Test accuracy %.2f%% (mean per class %.2f%%) in %.0f s; outputs in %s",
            results["test_acc"],
            results["test_mean_class_acc"],
            time.time() - t_start,
            self.out,
        )
        return results

    def _run_stage(
        self,
        index,
        name,
        stage,
        model,
        datasets,
        num_classes,
        logger,
        resume,
        start_epoch,
        eval_bs,
    ) -> None:
        tcfg, ckdir = self.tcfg, self.out / "checkpoints"
        finetune = name == "finetune"
        model.backbone.requires_grad_(finetune)
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
        val_ds = datasets.get("val")
        has_val = val_ds is not None and len(val_ds) > 0
        val_loader = self._loader(val_ds, eval_bs, False) if has_val else None
        common = dict(device=self.device, precision=self.precision, progress=tcfg.progress)
        for epoch in range(start_epoch, stage.epochs):
            t0 = time.time()
            # A generator seeded per (seed, stage, epoch) makes the shuffle order independent
            # of whether the run was interrupted.
            loader = self._loader(
                datasets["train"],
                stage.batch_size,
                True,
                seed=self.cfg.seed * 1_000_003 + index * 10_007 + epoch,
            )
            lr = optimizer.param_groups[-1]["lr"]
            stats = train_one_epoch(
                model,
                loader,
                optimizer,
                scaler,
                grad_accum=stage.grad_accum,
                grad_clip=stage.grad_clip,
                frozen_backbone=not finetune,
                limit=tcfg.limit_train_batches,
                desc=f"{name} {epoch + 1}/{stage.epochs}",
                **common,
            )
            scheduler.step()
            val = None
            if has_val:
                val = evaluate(
                    model,
                    val_loader,
                    num_classes,
                    flip=False,
                    limit=tcfg.limit_eval_batches,
                    desc="val",
                    **common,
                )
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
            logger.log_epoch(row)
            log.info(
                "%s epoch %d/%d: loss %.4f, train acc %.2f, val acc %.2f",
                name,
                epoch + 1,
                stage.epochs,
                stats.loss,
                stats.acc,
                row["val_acc"],
            )
            # Without a validation split the latest epoch is the selected one.
            metric = row["val_acc"] if has_val else float(epoch)
            state = None
            if metric > best:
                best, best_epoch = metric, epoch
                state = self._state(
                    model, optimizer, scheduler, scaler, (index, epoch + 1), best, best_epoch
                )
                save_atomic(state, ckdir / "best.pt")
            state = state or self._state(
                model, optimizer, scheduler, scaler, (index, epoch + 1), best, best_epoch
            )
            save_atomic(state, ckdir / "last.pt")

        # The selected (best-validation) weights are evaluated once on the test split.
        if best_epoch != stage.epochs - 1 and (ckdir / "best.pt").exists():
            model.load_state_dict(load_checkpoint(ckdir / "best.pt")["model"])
        result = {"best_epoch": best_epoch + 1, "epochs": stage.epochs}
        if has_val:
            val = evaluate(
                model,
                val_loader,
                num_classes,
                flip=False,
                limit=tcfg.limit_eval_batches,
                desc="val",
                **common,
            )
            result.update(val_acc=val.accuracy(), val_mean_class_acc=val.mean_class_accuracy())
        else:
            result.update(val_acc=None, val_mean_class_acc=None)
        test = evaluate(
            model,
            self._loader(datasets["test"], eval_bs, False),
            num_classes,
            flip=tcfg.test_flip,
            limit=tcfg.limit_eval_batches,
            desc="test",
            **common,
        )
        result.update(test_acc=test.accuracy(), test_mean_class_acc=test.mean_class_accuracy())
        self.stage_results[name] = result
        log.info("Stage %s done: %s", name, result)
        # The next stage starts from these weights; a resume after this point skips ahead.
        save_atomic(
            self._state(model, None, None, None, (index + 1, 0), -math.inf, -1),
            ckdir / "last.pt",
        )
