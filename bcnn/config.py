"""Structured-config schemas: Hydra validates key names and types at composition.

The schema is registered in Hydra's ConfigStore as ``train_schema`` and is the first
entry of ``configs/train.yaml``'s defaults, so a misspelt key or a wrong type fails
when the config is composed. Value ranges (a negative learning rate, an unknown
optimizer) are checked by ``validate`` before any data or model is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

STAGES = ("linear", "finetune")
PRECISIONS = ("32", "bf16", "fp16")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"Invalid config value for '{key}': {message}")


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

    def validate(self, prefix: str) -> None:
        """Raises ValueError naming ``prefix.<key>`` for out-of-range values."""
        _check(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        _check(self.backbone_lr >= 0, f"{prefix}.backbone_lr", "must be >= 0")
        _check(self.epochs >= 1, f"{prefix}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, f"{prefix}.grad_accum", "must be >= 1")
        _check(self.grad_clip is None or self.grad_clip > 0, f"{prefix}.grad_clip", "must be > 0")


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
        for s in self.stages:
            getattr(self, s).validate(f"trainer.{s}")
        if "finetune" in self.stages:
            _check(
                self.finetune.backbone_lr > 0,
                "trainer.finetune.backbone_lr",
                "must be > 0 when the finetune stage runs",
            )
        _check(self.precision in PRECISIONS, "trainer.precision", f"choose one of {PRECISIONS}")
        _check(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
            "trainer.device",
            f"use auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        _check(self.num_workers >= 0, "trainer.num_workers", "must be >= 0")
        _check(
            self.cache_features.lower() in ("true", "false", "auto"),
            "trainer.cache_features",
            f"use true, false or auto, got {self.cache_features!r}",
        )
        _check(
            self.cache_dtype in ("float32", "float16"),
            "trainer.cache_dtype",
            "use float32 or float16",
        )
        for key in ("eval_batch_size", "limit_train_batches", "limit_eval_batches"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"trainer.{key}", "must be >= 1 or null")


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


def register_configs() -> None:
    """Stores the schema as ``train_schema`` in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def validate(cfg: DictConfig) -> None:
    """Checks value ranges the schema's types cannot express.

    Raises:
        ValueError: naming the offending key and what is allowed.
    """
    for group in ("backbone", "pooling", "normalization", "classifier", "dataset", "logger"):
        node = cfg.get(group)
        _check(
            isinstance(node, DictConfig) and "_target_" in node,
            group,
            f"the '{group}' group must select a config with a _target_ (e.g. {group}=<option>)",
        )
    trainer = OmegaConf.to_object(cfg.trainer)
    assert isinstance(trainer, TrainerConfig)
    trainer.validate()
    for name in trainer.stages:
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
    """Builds the stage's optimizer and scheduler on a dummy parameter.

    torch checks its own arguments (a negative momentum, betas outside [0, 1), an unknown
    keyword): this surfaces those errors, with the key, before any data is read.
    """
    import torch

    for key in ("optimizer", "scheduler"):
        _check(
            isinstance(stage.get(key), DictConfig) and "_target_" in stage[key],
            f"{prefix}.{key}",
            f"select a {key} config with a _target_ (e.g. {key}@{prefix}.{key}=<option>)",
        )
    param = torch.zeros(1, requires_grad=True)
    try:
        optimizer = instantiate(stage.optimizer)([param], lr=float(stage.lr))
    except (TypeError, ValueError) as err:
        raise ValueError(f"Invalid config value for '{prefix}.optimizer': {err}") from None
    try:
        instantiate(stage.scheduler)(optimizer)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Invalid config value for '{prefix}.scheduler': {err}") from None


register_configs()
