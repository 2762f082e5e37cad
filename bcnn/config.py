"""Structured-config schemas and ``validate``: every config value checked before any work.

The schema is registered in Hydra's ConfigStore as ``train_schema`` and is the first
entry of ``configs/train.yaml``'s defaults, so a misspelt key or a wrong type fails
when the config is composed. ``validate`` checks the rest before any data or model is
touched: keys added with ``+`` (which bypass the schema), value ranges, the device, and
every group node against the signature of its ``_target_`` (``bcnn.validation``). Each
failure is one ``ConfigError`` (a ``ValueError``) naming the key, the value and what is
allowed.

It also registers the ``${bcnn.uid:}`` resolver: a short random id, the same for every
use within one composed config, that keeps run and sweep directories started in the same
second apart (``configs/train.yaml``).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bcnn.validation import SEED_MAX, ConfigError, check_node, show

STAGES = ("linear", "finetune")
PRECISIONS = ("32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
# What bcnn passes to each group's target itself (setting it in the config is an error).
GROUP_ARGS: dict[str, tuple[str, ...]] = {
    "backbone": (),
    "pooling": ("in_channels",),
    "normalization": (),
    "classifier": ("in_features", "num_classes"),
    "dataset": ("split", "augment"),
    "logger": ("output_dir", "run_config"),
}
STAGE_ARGS = {"optimizer": ("params", "lr"), "scheduler": ("optimizer",)}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


@dataclass
class StageConfig:
    """One training stage (``trainer.linear`` or ``trainer.finetune``).

    ``lr`` is the learning rate of everything after the backbone (pooling projection and
    classifier); ``backbone_lr`` that of the backbone (used only when it trains).
    ``optimizer`` and ``scheduler`` are ``_partial_`` Hydra nodes (config groups
    ``optimizer`` and ``scheduler``): ``optimizer(param_groups, lr=lr)`` and
    ``scheduler(optimizer)`` build them; schedules step once per epoch.
    ``batch_size`` is the micro-batch; the optimizer steps every ``grad_accum`` of them.
    """

    optimizer: Any = MISSING
    scheduler: Any = MISSING
    lr: float = 1.0
    backbone_lr: float = 0.0
    epochs: int = 10
    batch_size: int = 64
    grad_accum: int = 1
    grad_clip: float | None = None
    # MATLAB's bcnn_train_dag.m starts every epoch with a zero momentum buffer.
    reset_optimizer_each_epoch: bool = False

    def validate(self, prefix: str) -> None:
        """Raises ValueError naming ``prefix.<key>`` for out-of-range values."""
        for key in ("lr", "backbone_lr", "grad_clip"):
            value = getattr(self, key)
            _check(_finite(value), f"{prefix}.{key}", f"must be finite, got {value}")
        _check(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        _check(
            self.backbone_lr >= 0, f"{prefix}.backbone_lr", f"must be >= 0, got {self.backbone_lr}"
        )
        for key in ("epochs", "batch_size", "grad_accum"):
            value = getattr(self, key)
            _check(value >= 1, f"{prefix}.{key}", f"must be >= 1, got {value}")
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            f"{prefix}.grad_clip",
            f"must be > 0 or null, got {self.grad_clip}",
        )


@dataclass
class TrainerConfig:
    """The training engine's settings (``trainer.*``)."""

    stages: list[str] = field(default_factory=lambda: ["linear", "finetune"])
    linear: StageConfig = field(default_factory=StageConfig)
    finetune: StageConfig = field(default_factory=StageConfig)
    device: str = "auto"
    precision: str = "32"
    num_workers: int = 0
    eval_batch_size: int | None = None
    test_flip: bool = False
    progress: bool = True
    resume: str | None = None
    limit_train_batches: int | None = None
    limit_eval_batches: int | None = None
    channels_last: bool = False
    compile: bool = False
    cache_features: str = "auto"
    cache_dir: str | None = None
    cache_dtype: str = "float32"

    def validate(self) -> None:
        """Raises ValueError naming ``trainer.<key>`` for out-of-range values."""
        _check(len(self.stages) > 0, "trainer.stages", "name at least one stage")
        for s in self.stages:
            _check(s in STAGES, "trainer.stages", f"unknown stage {s!r}; choose from {STAGES}")
        _check(len(set(self.stages)) == len(self.stages), "trainer.stages", "a stage is repeated")
        # Both stages, also one that does not run: a value out of range is wrong either way.
        for s in STAGES:
            getattr(self, s).validate(f"trainer.{s}")
        if "finetune" in self.stages:
            _check(
                self.finetune.backbone_lr > 0,
                "trainer.finetune.backbone_lr",
                "must be > 0 when the finetune stage runs",
            )
        _check(
            self.precision in PRECISIONS,
            "trainer.precision",
            f"must be one of {', '.join(PRECISIONS)}; got {self.precision!r}",
        )
        check_device(self.device)
        _check(
            self.num_workers >= 0, "trainer.num_workers", f"must be >= 0, got {self.num_workers}"
        )
        _check(
            self.cache_features.lower() in ("true", "false", "auto"),
            "trainer.cache_features",
            f"must be true, false or auto; got {self.cache_features!r}",
        )
        _check(
            self.cache_dtype in ("float32", "float16"),
            "trainer.cache_dtype",
            f"must be float32 or float16; got {self.cache_dtype!r}",
        )
        for key in ("eval_batch_size", "limit_train_batches", "limit_eval_batches"):
            value = getattr(self, key)
            _check(
                value is None or value >= 1, f"trainer.{key}", f"must be >= 1 or null, got {value}"
            )
        for key in ("cache_dir", "resume"):
            value = getattr(self, key)
            _check(value is None or value.strip() != "", f"trainer.{key}", "must not be empty")


def check_device(name: str, key: str = "trainer.device") -> None:
    """Rejects a device that is malformed or absent on this machine.

    Raises:
        ConfigError: naming ``key``, the device and what this machine has.
    """
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(key, f"must be one of {', '.join(DEVICES)}; got {show(name)}")
    if device.type == "cpu" and device.index is not None:
        raise ConfigError(key, f"cpu takes no index; use trainer.device=cpu, got {show(name)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch ({torch.__version__}) is built without CUDA"
                if torch.version.cuda is None
                else "no NVIDIA GPU or driver is visible (CUDA_VISIBLE_DEVICES?)"
            )
            raise ConfigError(
                key, f"{show(name)} but {why}; use trainer.device=cpu or trainer.device=auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                key,
                f"{show(name)} but this machine has {count} GPU(s): use cuda:0 to cuda:{count - 1}",
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            key, f"{show(name)} but Metal (MPS) is not available here; use cpu or auto"
        )


@dataclass
class PathsConfig:
    """Where data is read and the run writes (``paths.*``)."""

    data_dir: str = "data"
    output_dir: str | None = None


@dataclass
class TrainConfig:
    """The root config. Group nodes are free-form here; each has its own ``_target_``."""

    backbone: Any = MISSING
    pooling: Any = MISSING
    normalization: Any = MISSING
    classifier: Any = MISSING
    dataset: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    experiment: Any = None
    debug: Any = None
    hparams_search: Any = None
    seed: int = 0


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` (with ``_convert_="all"``) that lets our errors through.

    Hydra wraps whatever the target raises in an ``InstantiationException`` and shows its
    repr; the constructors' ValueError / FileNotFoundError / WeightsUnavailableError
    already name the config key or file and the fix, and callers catch them by type.
    """
    kwargs.setdefault("_convert_", "all")
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def _unique_id() -> str:
    """Six random hex digits (``${bcnn.uid:}``): cached per config, like ``${now:...}``."""
    return secrets.token_hex(3)


def register_configs() -> None:
    """Stores the schema as ``train_schema`` in Hydra's ConfigStore and registers the
    ``bcnn.uid`` resolver (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("bcnn.uid"):
        # Cached: every use in one config (and, through Hydra's cache copy, every job of a
        # sweep) sees the same id.
        OmegaConf.register_new_resolver("bcnn.uid", _unique_id, use_cache=True)


def _plain(node: Any, key: str) -> Any:
    """A config node as plain, resolved containers (errors name the key)."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(key, f"cannot be resolved: {err}".splitlines()[0]) from None


def _unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """Keys added with ``+`` bypass the structured schema: reject them here."""
    names = [f.name for f in fields(schema)]
    for key in node:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                full, f"no such setting; valid keys: {', '.join(names)}", unknown=True
            )


def _check_group(cfg: DictConfig, group: str, files: bool) -> None:
    node = cfg.get(group)
    plain = _plain(node, group)
    provided = GROUP_ARGS[group]
    if isinstance(plain, dict) and "_target_" in plain:
        check_node(plain, group, provided, files=files)
        return
    if group == "logger" and isinstance(plain, dict) and plain:
        # Several loggers at once: a mapping of named logger nodes.
        for name, sub in plain.items():
            if sub is not None:
                check_node(sub, f"{group}.{name}", provided, files=files)
        return
    raise ConfigError(
        group, f"select a config with a _target_ ({group}=<option>), got {show(plain)}"
    )


def validate(cfg: DictConfig, files: bool = False) -> None:
    """Checks every value of a composed config before any data or model work.

    Unknown keys (also those added with ``+``), types, ranges and options of every group
    (by the signature of its ``_target_``, see ``bcnn.validation``), the trainer's
    settings, the device's presence on this machine, the seed, and each stage's optimizer
    and schedule (built on a dummy parameter).

    Args:
        cfg: The composed config.
        files: Also check the files the config names (``backbone.weights`` exists and is
            a torch or safetensors file); ``train`` does, a config prepared for another
            machine need not.

    Raises:
        ConfigError: a ``ValueError`` naming the key, the value and what is allowed.
    """
    _unknown_keys(cfg, TrainConfig, "")
    _unknown_keys(cfg.trainer, TrainerConfig, "trainer")
    _unknown_keys(cfg.paths, PathsConfig, "paths")
    for name in STAGES:
        _unknown_keys(cfg.trainer[name], StageConfig, f"trainer.{name}")
    seed = cfg.seed
    _check(
        isinstance(seed, int) and 0 <= seed <= SEED_MAX,
        "seed",
        f"must be an integer in [0, {SEED_MAX}], got {show(seed)}",
    )
    for key in ("data_dir", "output_dir"):
        value = _plain(cfg.paths.get(key), f"paths.{key}")
        _check(
            value is None or str(value).strip() != "",
            f"paths.{key}",
            "must not be empty" + ("" if key == "data_dir" else " (null: Hydra's directory)"),
        )
    for group in GROUP_ARGS:
        _check_group(cfg, group, files)
    trainer = OmegaConf.to_object(cfg.trainer)
    assert isinstance(trainer, TrainerConfig)
    trainer.validate()
    for name in STAGES:
        _check_schedule(cfg.trainer[name], f"trainer.{name}")
    if str(cfg.classifier._target_).endswith(".SVMClassifier"):
        # SVMs are fitted on cached descriptors in the linear stage, never fine-tuned.
        _check(
            list(trainer.stages) == ["linear"],
            "trainer.stages",
            f"classifier=svm trains in the linear stage only: use [linear], got {trainer.stages}",
        )
        _check(
            trainer.cache_features.lower() != "false",
            "trainer.cache_features",
            "classifier=svm fits on cached descriptors: use auto or true",
        )


def _check_schedule(stage: DictConfig, prefix: str) -> None:
    """Checks the stage's optimizer and schedule nodes, then builds both on a dummy parameter.

    torch checks its own arguments (a negative momentum, betas outside [0, 1)): building
    them surfaces those errors, with the key, before any data is read.
    """
    import torch

    for key in ("optimizer", "scheduler"):
        check_node(_plain(stage.get(key), f"{prefix}.{key}"), f"{prefix}.{key}", STAGE_ARGS[key])
    param = torch.zeros(1, requires_grad=True)
    try:
        optimizer = instantiate(stage.optimizer)([param], lr=float(stage.lr))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix}.optimizer", str(err)) from None
    try:
        instantiate(stage.scheduler)(optimizer)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix}.scheduler", str(err)) from None


register_configs()
