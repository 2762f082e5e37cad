"""One training stage: what it reads (images, or the feature cache), its epoch loop, its
optimization and the choice of its epoch, with the recipe tools its config switches on
(label smoothing, timm's mixup / cutmix and weight average, early stopping, top-k
checkpoints, the MATLAB trainer's per-epoch optimizer reset).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from omegaconf import OmegaConf
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, DistributedSampler, Subset

from bcnn.config import StageConfig, instantiate
from bcnn.engine import distributed as D
from bcnn.engine.cache import CachedViews, Split, ViewAverage, build_cache
from bcnn.engine.checkpoint import link_checkpoint, save_atomic, save_checkpoint, set_rng_state
from bcnn.engine.loops import EpochStats, train_one_epoch
from bcnn.errors import ConfigError, DivergenceError

if TYPE_CHECKING:
    from bcnn.engine.trainer import _Run

log = logging.getLogger(__name__)


@dataclass
class StageInputs:
    """What a stage trains and evaluates: live images through the model, or cached
    descriptors through the classifier alone (``net`` is then a ``ViewAverage``)."""

    net: nn.Module
    train: Split
    val: Split | None
    test: Split
    eval_batch: int
    workers: int
    test_flip: bool
    cache_folder: Path | None = None  # a cache inside the run directory: removed after use


def stage_inputs(run: _Run, stage: str) -> StageInputs:
    """What ``stage`` of ``run`` reads: the images, or, where ``trainer.cache_features``
    allows, the feature cache of each split (only the classifier trains after a frozen
    backbone, and the stage mixes no images; never in ``finetune``).

    Raises:
        ConfigError: ``trainer.cache_features=true`` where the cache cannot serve.
    """
    model, trainer, node = run.model, run.tcfg, run.tcfg[stage]
    batch_size = trainer.eval_batch_size or node.batch_size  # also the batch that caches
    mode = str(trainer.cache_features).lower()
    trains = [n for n, p in model.named_parameters() if p.requires_grad]
    extra = [n for n in trains if not n.startswith(("backbone.", "classifier."))]
    why = [f"trainable layers besides the classifier after the backbone {extra}"] if extra else []
    if node.mixup_alpha or node.cutmix_alpha:
        why.append("a stage that mixes images (mixup_alpha, cutmix_alpha)")
    if mode == "true" and why and stage != "finetune":
        raise ConfigError(
            "trainer.cache_features", f"true cannot serve {'; '.join(why)}: use auto or false"
        )
    if stage == "finetune" or mode == "false" or why:
        sets = {role: ds for role, (_, ds) in run.splits.items()}
        return StageInputs(
            model, sets["train"], sets.get("val"), sets["test"], batch_size, trainer.num_workers,
            trainer.test_flip,
        )  # fmt: skip
    folder = Path(trainer.cache_dir) if trainer.cache_dir else run.out / "feature_cache"
    recipe = run.cfg.dataset.get("transform")
    flips = {"train": bool(recipe and recipe.get("hflip", True)), "test": trainer.test_flip}
    dataset = OmegaConf.to_container(run.cfg.dataset, resolve=True)
    cache = {}
    for role, (split, ds) in run.splits.items():
        if role == "val" and len(ds) == 0:
            continue
        # The cache holds the centre view of each training image (and its mirror image).
        ds = run.train_view() if role == "train" else ds
        identity = {"dataset": dataset, "split": split, "precision": str(trainer.precision)}
        # A limited run (limit_*_batches, debug=smoke) reads only the first batches: cache those.
        limit, size = trainer.limit_eval_batches, batch_size
        if role == "train":
            limit, size = trainer.limit_train_batches, node.batch_size
        if limit is not None and limit * size < len(ds):
            ds = Subset(ds, range(limit * size))
            identity["images"] = len(ds)
        feats, labels = build_cache(
            model, ds, folder, identity, views=2 if flips.get(role) else 1,
            dtype=trainer.cache_dtype, batch_size=batch_size, device=run.device,
            precision=trainer.precision, num_workers=trainer.num_workers, env=run.env,
            progress=run.progress,
        )  # fmt: skip
        shape = model.descriptor_shape.dims
        cache[role] = CachedViews(feats, labels, train=role == "train", shape=shape)
    # Memory maps are read in-process; the cached views already hold the flips.
    return StageInputs(
        ViewAverage(model.classifier), cache["train"], cache.get("val"), cache["test"],
        batch_size, workers=0, test_flip=False, cache_folder=None if trainer.cache_dir else folder,
    )  # fmt: skip


@dataclass
class Selection:
    """A stage's best epoch (by validation accuracy, else the latest) and, with
    ``trainer.save_top_k``, its k best as ``(metric, epoch)``."""

    metric: float = -math.inf
    epoch: int = -1
    top: list[tuple[float, int]] = field(default_factory=list)

    def offer(self, metric: float, epoch: int, min_delta: float = 0.0) -> bool:
        """Records ``epoch`` if it beats the best by more than ``min_delta``; whether it did."""
        if metric > self.metric + min_delta:
            self.metric, self.epoch = metric, epoch
            return True
        return False

    def rank(self, metric: float, epoch: int, k: int) -> list[int]:
        """Adds ``epoch`` to the k best; returns the epochs not (or no longer) among them."""
        self.top = sorted([*self.top, (metric, epoch)], key=lambda t: (-t[0], t[1]))
        dropped = [e for _, e in self.top[k:]]
        del self.top[k:]
        return dropped


def mixing(stage: StageConfig, num_classes: int) -> Callable | None:
    """timm's mixup / cutmix of a batch with itself reversed, on [0, 1] images (None: off)."""
    if not (stage.mixup_alpha or stage.cutmix_alpha):
        return None
    # Smoothing is the loss's (label_smoothing): the same for mixed and unmixed targets.
    mixup = Mixup(
        mixup_alpha=stage.mixup_alpha,
        cutmix_alpha=stage.cutmix_alpha,
        label_smoothing=0.0,
        num_classes=num_classes,
    )

    def mix(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(labels) % 2:  # timm mixes pairs: an odd (last) batch trains unmixed
            return images, labels
        return mixup(images.float() / 255 if images.dtype == torch.uint8 else images, labels)

    return mix


class Stage:
    """The optimization of stage ``name`` (at ``index`` in ``trainer.stages``) of ``run``,
    resumed from the checkpoint ``resume`` at ``start_epoch`` when given."""

    def __init__(
        self,
        run: _Run,
        index: int,
        name: str,
        inputs: StageInputs,
        resume: dict[str, Any] | None,
        start_epoch: int,
    ) -> None:
        self.run, self.index, self.name, self.inputs = run, index, name, inputs
        node = run.tcfg[name]
        self.cfg = cast(StageConfig, OmegaConf.to_object(node))
        backbone_lr = self.cfg.backbone_lr if name == "finetune" else None
        groups = run.model.param_groups(self.cfg.lr, backbone_lr)
        self.optimizer = instantiate(node.optimizer)(groups, lr=self.cfg.lr)
        self.scheduler = instantiate(node.scheduler)(self.optimizer)
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision == "fp16")
        self.ema = ModelEmaV3(inputs.net, decay=self.cfg.ema_decay) if self.cfg.ema_decay else None
        self.mix = mixing(self.cfg, run.num_classes)
        self.selection = Selection()
        if resume is not None:
            if start_epoch > 0:
                for part in ("optimizer", "scheduler", "scaler", "ema"):
                    if getattr(self, part) is not None:
                        getattr(self, part).load_state_dict(resume[part])
                top = [tuple(t) for t in resume.get("top_k", [])]
                self.selection = Selection(resume["best_metric"], resume["best_epoch"], top)
            set_rng_state(resume["rng"])
        best = run.ckdir / "best.pt"
        if resume is not None and self.selection.epoch == start_epoch - 1 and not best.exists():
            # Killed between writing last.pt and best.pt: the resumed checkpoint is the best.
            if run.env.is_main:
                link_checkpoint(run.tcfg.resume, best)
            D.barrier()

    def fit(self, start_epoch: int) -> int:
        """Trains the epochs from ``start_epoch`` on; returns the number of epochs trained.

        Raises:
            DivergenceError: the loss or the weights stopped being finite.
        """
        run, cfg, inputs = self.run, self.cfg, self.inputs
        net = inputs.net
        if run.env.enabled:
            ids = [run.device.index] if run.device.type == "cuda" else None
            net = DistributedDataParallel(inputs.net, device_ids=ids)
        # Every process shuffles with the same seed and takes its share of each global
        # batch, so N processes see exactly the batches one process would.
        sampler: DistributedSampler[int] = DistributedSampler(
            inputs.train, num_replicas=run.env.world_size, rank=run.env.rank, shuffle=True,
            seed=run.cfg.seed * 1_000_003 + self.index,
        )  # fmt: skip
        loader = DataLoader(
            inputs.train, batch_size=cfg.batch_size // run.env.world_size, sampler=sampler,
            num_workers=inputs.workers, pin_memory=run.device.type == "cuda",
            persistent_workers=inputs.workers > 0,
        )  # fmt: skip
        for epoch in range(start_epoch, cfg.epochs):
            patience = cfg.early_stop_patience
            if patience and epoch - 1 - self.selection.epoch >= patience:
                log.info("%s: %d epochs without a better validation accuracy", self.name, patience)
                return epoch
            if cfg.reset_optimizer_each_epoch:
                self.optimizer.state.clear()  # momentum buffers, Adam's moments; not the schedule
            t0, lr = time.time(), self.optimizer.param_groups[-1]["lr"]
            sampler.set_epoch(epoch)
            stats = train_one_epoch(
                net, loader, self.optimizer, run.device, scaler=self.scaler,
                precision=run.precision, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                max_batches=run.tcfg.limit_train_batches, label_smoothing=cfg.label_smoothing,
                mix=self.mix, after_step=functools.partial(self._after_step, lr=lr),
                desc=f"{self.name} {epoch + 1}/{cfg.epochs}" if run.progress else None,
            ).all_reduce()  # fmt: skip
            flags = [p.detach().isfinite().all() for p in inputs.net.parameters()]
            if stats.diverged or not bool(torch.stack(flags).all()):
                raise DivergenceError(self._divergence(epoch, stats))
            self._end_epoch(epoch, lr, stats, time.time() - t0)
        return cfg.epochs

    def _after_step(self, loss: torch.Tensor, lr: float) -> None:
        """After each optimizer step: the weight average; the loss every N steps."""
        run = self.run
        run.step += 1
        if self.ema is not None:
            self.ema.update(self.inputs.net)
        if run.logger is not None and run.step % run.tcfg.log_every_n_steps == 0:
            tags = {f"{self.name}/step_train_loss": float(loss), f"{self.name}/step_lr": lr}
            run.logger.log_step(tags, run.step)

    def _end_epoch(self, epoch: int, lr: float, stats: EpochStats, seconds: float) -> None:
        """Validates the epoch (and the weight average), steps the schedule, selects, and
        writes ``last.pt``, ``best.pt`` and the top k."""
        run, inputs, k = self.run, self.inputs, self.run.tcfg.save_top_k
        has_val = inputs.val is not None and len(inputs.val) > 0
        val = run.evaluate(inputs.net, inputs, "val") if has_val else None
        extra: dict[str, float] = {}
        if self.ema is not None and has_val:
            extra["ema_val_acc"] = run.evaluate(self.ema.module, inputs, "val").accuracy()
        row = run.log_epoch(self.name, epoch, self.cfg.epochs, lr, stats, val, seconds, extra)
        if isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step(row["val_acc"] if has_val else stats.acc)
        else:
            self.scheduler.step()
        # The weight average is kept where it validates better, and without a validation
        # split (as timm does); there the latest epoch is the best.
        better = not has_val or extra.get("ema_val_acc", -math.inf) > row["val_acc"]
        ema = self.ema if better else None
        metric = max(row["val_acc"], extra.get("ema_val_acc", -math.inf)) if has_val else epoch
        min_delta = self.cfg.early_stop_min_delta if has_val else 0.0
        improved = self.selection.offer(metric, epoch, min_delta)
        dropped = self.selection.rank(metric, epoch, k) if k else [epoch]
        if run.env.is_main:
            state = run.state((self.index, epoch + 1), self.selection, self.state_dict())
            # last.pt first: a crash between the two writes leaves a resumable run.
            save_checkpoint(state, pick := run.ckdir / "last.pt")
            if ema is not None:
                weights = {**state["model"], **ema.module.state_dict()}
                save_atomic({**state, "model": weights}, pick := run.ckdir / "ema.pt")
            if improved:
                link_checkpoint(pick, run.ckdir / "best.pt")
            top = run.ckdir / "top"
            if epoch not in dropped:
                top.mkdir(exist_ok=True)
                link_checkpoint(pick, top / f"{self.name}_epoch{epoch + 1:03d}.pt")
            for e in dropped:
                (top / f"{self.name}_epoch{e + 1:03d}.pt").unlink(missing_ok=True)
        D.barrier()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the stage's optimization."""
        parts = {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}
        state = {k: v.state_dict() for k, v in parts.items()}
        return {**state, "ema": self.ema.state_dict() if self.ema is not None else None}

    def _divergence(self, epoch: int, stats: EpochStats) -> str:
        """Where the run diverged and which settings likely caused it."""
        name, cfg, run = self.name, self.cfg, self.run
        where = (
            f"step {stats.first_nonfinite_step + 1}"
            if stats.first_nonfinite_step is not None
            else "a step of another process"
            if stats.diverged
            else "its end (the weights are no longer finite)"
        )
        lrs = f"trainer.{name}.lr={cfg.lr}"
        if name == "finetune":
            lrs += f", trainer.finetune.backbone_lr={cfg.backbone_lr}"
        causes = [f"a learning rate too high ({lrs}; or set trainer.{name}.grad_clip)"]
        for part, module in run.model.named_children():
            # The model's parts name their own suspects (matrix-function ridges, LRN, ...).
            hints: list[str] = getattr(module, "divergence_hints", list)()
            if hints:
                causes.append(f"a {part} setting ({', '.join(f'{part}.{h}' for h in hints)})")
        if run.precision == "fp16":
            causes.append("an fp16 overflow in the forward pass (try trainer.precision=bf16)")
        last = run.ckdir / "last.pt"
        kept = (
            f"The last good checkpoint is kept: {last}."
            if last.exists()
            else "No epoch had finished, so there is no checkpoint."
        )
        return (
            f"Training diverged: the loss of the {name} stage is not finite at epoch "
            f"{epoch + 1}/{cfg.epochs}, {where}. Likely causes: {'; '.join(causes)}. "
            f"{kept} No results.json was written."
        )


def fit_on_cache(run: _Run, index: int, name: str, inputs: StageInputs) -> Selection:
    """Fits a ``trains_on_cache`` classifier on cached descriptors in one go, as one epoch
    (``fit(features, labels)`` gives its ``objective`` and ``train_accuracy``).

    Raises:
        ValueError: the stage does not read the feature cache.
    """
    classifier: Any = run.model.classifier  # has fit() (trains_on_cache)
    if inputs.net is run.model:
        raise ValueError(
            f"classifier={type(classifier).__name__} trains on cached descriptors: it needs "
            "the feature cache (trainer.cache_features=auto or true) and a model whose only "
            "trainable layer after the backbone is the classifier"
        )
    t0 = time.time()
    info = classifier.fit(inputs.train.features, inputs.train.labels)
    # One row for the whole fit: the objective per training view, training accuracy.
    n = int(np.prod(inputs.train.features.shape[:2]))
    stats = EpochStats(info["objective"], round(info["train_accuracy"] * n), n)
    val = run.evaluate(inputs.net, inputs, "val") if inputs.val else None
    row = run.log_epoch(name, 0, 1, math.nan, stats, val, time.time() - t0)
    selection = Selection(row["val_acc"] if val else 0.0, 0)
    if run.env.is_main:
        save_atomic(run.state((index, 1), selection), run.ckdir / "best.pt")
    return selection
