"""The train schema and ``validate``: every config value checked before any work.

The schema is registered in Hydra's ConfigStore as ``train_schema`` and is the first entry
of ``configs/train.yaml``'s defaults, so a misspelt key fails when the config is composed.
``validate`` checks the rest before any data or model is touched: keys added with ``+``
(which bypass the schema), every value of the trainer, paths and root keys against the
annotations of the dataclasses below, and every group node against the signature of its
``_target_`` (:mod:`bcnn.limits`: the limits are declared once, on the parameters). Each
failure is one :class:`~bcnn.errors.ConfigError` naming the key, the value and what is
allowed.

It also registers the ``${bcnn.uid:}`` resolver: a short random id, the same for every use
within one composed config, that keeps run and sweep directories started in the same second
apart (``configs/train.yaml``).
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from annotated_types import Ge, Interval, MinLen
from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bcnn.errors import ConfigError, instantiate, show
from bcnn.limits import (
    Check,
    NonEmpty,
    NonNegative,
    Positive,
    PositiveInt,
    Seed,
    WritableDir,
    check_node,
    is_target_node,
    problem,
    signature,
)

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


def device_problem(name: Any) -> str | None:
    """What is wrong with a device name on this machine (malformed, or absent), or None."""
    import torch

    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        return f"must be one of {', '.join(DEVICES)}; got {show(name)}"
    if device.type == "cpu" and device.index is not None:
        return f"cpu takes no index; use cpu, got {show(name)}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch ({torch.__version__}) is built without CUDA"
                if torch.version.cuda is None
                else "no NVIDIA GPU or driver is visible (CUDA_VISIBLE_DEVICES?)"
            )
            return f"{show(name)} but {why}; use cpu or auto"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return (
                f"{show(name)} but this machine has {count} GPU(s): use cuda:0 to cuda:{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{show(name)} but Metal (MPS) is not available here; use cpu or auto"
    return None


def check_device(name: str, key: str) -> None:
    """Raises a :class:`~bcnn.errors.ConfigError` naming ``key`` for an unusable device."""
    found = device_problem(name)
    if found:
        raise ConfigError(key, found)


Device = Annotated[str, Check(device_problem)]


def _distinct(stages: Any) -> str | None:
    return "a stage is repeated" if len(set(stages)) != len(stages) else None


@dataclass
class StageConfig:
    """One training stage (``trainer.linear`` or ``trainer.finetune``).

    ``lr`` is the learning rate of everything after the backbone (pooling projection and
    classifier); ``backbone_lr`` that of the backbone (used only when it trains).
    ``optimizer`` and ``scheduler`` are ``_partial_`` Hydra nodes (config groups
    ``optimizer`` and ``scheduler``): ``optimizer(param_groups, lr=lr)`` and
    ``scheduler(optimizer)`` build them; schedules step once per epoch. ``batch_size`` is
    the micro-batch; the optimizer steps every ``grad_accum`` of them.
    """

    optimizer: Any = MISSING
    scheduler: Any = MISSING
    lr: Positive = 1.0
    backbone_lr: NonNegative = 0.0
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64
    grad_accum: PositiveInt = 1
    grad_clip: Positive | None = None
    # Training-recipe tools, all off by default so that the published recipes stay exact.
    label_smoothing: Annotated[float, Interval(ge=0, lt=1)] = 0.0
    mixup_alpha: Annotated[float, Ge(0)] = 0.0
    cutmix_alpha: Annotated[float, Ge(0)] = 0.0
    # Decay of an exponential moving average of the weights, validated beside them.
    ema_decay: Annotated[float, Interval(gt=0, lt=1)] | None = None
    # Stop after this many epochs without a validation accuracy better by min_delta.
    early_stop_patience: Annotated[int, Ge(1)] | None = None
    early_stop_min_delta: Annotated[float, Ge(0)] = 0.0
    # MATLAB's bcnn_train_dag.m starts every epoch with a zero momentum buffer.
    reset_optimizer_each_epoch: bool = False


@dataclass
class TrainerConfig:
    """The training engine's settings (``trainer.*``)."""

    stages: Annotated[list[Literal["linear", "finetune"]], MinLen(1), Check(_distinct)] = field(
        default_factory=lambda: ["linear", "finetune"]
    )
    linear: StageConfig = field(default_factory=StageConfig)
    finetune: StageConfig = field(default_factory=StageConfig)
    device: Device = "auto"
    precision: Literal["32", "bf16", "fp16"] = "32"
    num_workers: Annotated[int, Ge(0)] = 0
    eval_batch_size: PositiveInt | None = None
    test_flip: bool = False
    progress: bool = True
    resume: NonEmpty | None = None
    limit_train_batches: PositiveInt | None = None
    limit_eval_batches: PositiveInt | None = None
    channels_last: bool = False
    compile: bool = False
    cache_features: bool | Literal["auto"] = "auto"
    cache_dir: WritableDir | None = None
    cache_dtype: Literal["float32", "float16"] = "float32"
    # Keep checkpoints/top/<stage>_epoch<N>.pt of the k best epochs by validation metric.
    save_top_k: Annotated[int, Ge(0)] = 0
    # Loggers record the training loss and learning rate every this many optimizer steps.
    log_every_n_steps: Annotated[int, Ge(1)] = 50

    @staticmethod
    def config_problem(values: dict[str, Any]) -> tuple[str, str] | None:
        """A finetune stage trains the backbone."""
        if "finetune" in values["stages"] and not values["finetune"]["backbone_lr"] > 0:
            return "finetune.backbone_lr", "must be > 0 when the finetune stage runs"
        return None


@dataclass
class PathsConfig:
    """Where data is read and the run writes (``paths.*``)."""

    data_dir: NonEmpty = "data"
    output_dir: WritableDir | None = None  # null: Hydra's directory


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
    seed: Seed = 0


def _omegaconf_type(ann: Any) -> Any:
    """The type OmegaConf is given for a field annotated ``ann``.

    OmegaConf knows no ``Literal`` (its values' type stands in) nor unions beyond
    ``Optional``; and it turns ``'yes'`` or ``'off'`` into a bool for a bool field, where
    bcnn has one rule for every boolean, ``true`` or ``false``: booleans stay untyped here
    and ``validate`` checks them from the annotation.
    """
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return type(args[0])
    if origin is list:
        return list[_omegaconf_type(args[0])]  # type: ignore[misc]
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        return _omegaconf_type(arms[0]) | None if len(arms) == 1 else Any
    return Any if ann is bool else ann


@functools.cache
def _omegaconf_schema(cls: type) -> type:
    """``cls`` with OmegaConf's field types (:func:`_omegaconf_type`), same defaults and
    ``isinstance``."""
    changed: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        ann = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(ann):
            loose = _omegaconf_schema(ann)  # type: ignore[arg-type]
            changed.append((f.name, loose, field(default_factory=loose)))
        elif _omegaconf_type(ann) != ann:
            default = field(default=f.default, default_factory=f.default_factory)
            changed.append((f.name, _omegaconf_type(ann), default))
    return dataclasses.make_dataclass(cls.__name__, changed, bases=(cls,))


def schema() -> DictConfig:
    """The train schema as an OmegaConf node, to merge a saved config into (typed like a
    composed one)."""
    return OmegaConf.structured(_omegaconf_schema(TrainConfig))


def register_configs() -> None:
    """Stores the schema as ``train_schema`` in Hydra's ConfigStore and registers the
    ``bcnn.uid`` resolver (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=_omegaconf_schema(TrainConfig))
    if not OmegaConf.has_resolver("bcnn.uid"):
        # Cached: every use in one config (and, through Hydra's cache copy, every job of a
        # sweep) sees the same id.
        OmegaConf.register_new_resolver("bcnn.uid", lambda: secrets.token_hex(3), use_cache=True)


def _plain(node: Any, key: str) -> Any:
    """A config node as plain, resolved containers (errors name the key)."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(key, f"cannot be resolved: {err}".splitlines()[0]) from None


def _check_fields(node: DictConfig, schema: type, prefix: str, files: bool) -> None:
    """Every key of ``node`` is a field of ``schema`` (those added with ``+`` bypass the
    structured schema) and every value fits its field's annotation."""
    hints = typing.get_type_hints(schema, include_extras=True)
    names = [f.name for f in dataclasses.fields(schema)]
    for key in map(str, node):
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                full, f"no such setting; valid keys: {', '.join(names)}", unknown=True
            )
        ann = hints[str(key)]
        if dataclasses.is_dataclass(ann):
            _check_fields(node[key], ann, f"{full}.", files)  # type: ignore[arg-type]
        elif ann is not Any:
            found = problem(_plain(node[key], full), ann, files)
            if found:
                raise ConfigError(full, found)
    rule = getattr(schema, "config_problem", None)
    if rule and (found_node := rule(_plain(node, prefix[:-1]))):
        raise ConfigError(f"{prefix}{found_node[0]}", found_node[1])


def _check_group(cfg: DictConfig, group: str, files: bool) -> None:
    plain = _plain(cfg.get(group), group)
    if not is_target_node(plain):
        why = f"select a config with a _target_ ({group}=<option>), got {show(plain)}"
        raise ConfigError(group, why)
    check_node(plain, group, GROUP_ARGS[group], files=files)


def validate(cfg: DictConfig, files: bool = False) -> None:
    """Checks every value of a composed config before any data or model work.

    Unknown keys (also those added with ``+``), types, ranges and options of the trainer,
    paths and root keys and of every group (by the signature of its ``_target_``), the
    device's presence on this machine, what the parts need of the stages, and each
    stage's optimizer and schedule (built on a dummy parameter).

    Args:
        cfg: The composed config.
        files: Also check what the config names on this machine: ``backbone.weights``
            exists and is a weights file, the output and cache directories can be created
            and written, a dataset generated in memory fits. ``train`` does; a config
            prepared for another machine need not.

    Raises:
        ConfigError: a ``ValueError`` naming the key, the value and what is allowed.
    """
    _check_fields(cfg, TrainConfig, "", files)
    for group in GROUP_ARGS:
        _check_group(cfg, group, files)
    stages = list(cfg.trainer.stages)
    for group in ("pooling", "classifier"):
        # A part that never fine-tunes (a Fisher vector, SVMs) says so, and why.
        why = getattr(get_object(cfg[group]._target_), "linear_stage_only", None)
        if why and stages != ["linear"]:
            raise ConfigError(
                "trainer.stages", f"{group}: {why}: use trainer.stages=[linear], got {stages}"
            )
    if getattr(get_object(cfg.classifier._target_), "trains_on_cache", False) and (
        str(cfg.trainer.cache_features).lower() == "false"
    ):
        raise ConfigError(
            "trainer.cache_features", "this classifier fits on cached descriptors: use auto or true"
        )
    if files:
        # Here, not at the top: the configs compose without torch (bcnn-reproduce's list).
        from bcnn.models.plan import check_dataset_memory

        check_dataset_memory(cfg.dataset)
    for name in STAGES:
        _check_schedule(cfg.trainer[name], f"trainer.{name}")


def _switched(key: str) -> str:
    """A hint for a key that another optimizer or schedule takes: a recipe or experiment set
    it for the class it chose, and the command line chose another."""
    from bcnn.engine import optim

    name = key.rsplit(".", 1)[-1]
    owners = [
        c.__name__
        for c in vars(optim).values()
        if isinstance(c, type)
        and c.__module__ == optim.__name__
        and not c.__name__.startswith("_")
        and name in signature(c).params
    ]
    if not owners:
        return ""
    return (
        f". {name} is an argument of {', '.join(owners)}: a recipe or experiment set it for "
        f"the class it chose; with another one, drop it: '~{key}'"
    )


def _check_schedule(stage: DictConfig, prefix: str) -> None:
    """Checks the stage's optimizer and schedule nodes, then builds both on a dummy parameter:
    the errors of classes that declare no limits (torch's own) surface before any data is read.
    """
    import torch

    for key in ("optimizer", "scheduler"):
        try:
            check_node(_plain(stage[key], f"{prefix}.{key}"), f"{prefix}.{key}", STAGE_ARGS[key])
        except ConfigError as err:
            if not err.unknown:
                raise
            raise ConfigError(err.key, err.problem + _switched(err.key), unknown=True) from None
    param = torch.zeros(1, requires_grad=True)
    optimizer = None
    for key in ("optimizer", "scheduler"):
        try:
            built = instantiate(stage[key])
            optimizer = (
                built([param], lr=float(stage.lr)) if optimizer is None else built(optimizer)
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{prefix}.{key}", str(err)) from None


register_configs()
