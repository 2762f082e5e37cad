"""Config values checked against the code they reach, before any data or model work.

A config node with a ``_target_`` is checked against the target's signature:

* every key must be a parameter (``+pooling.foo=1`` is an error naming the valid keys);
  keys that bcnn itself passes (``in_channels`` of a pooling head, ``lr`` of an optimizer)
  may not be set;
* every value must fit the parameter's type annotation: an integer for ``int`` (not 1.5),
  ``true``/``false`` for ``bool`` (not ``maybe``), a finite number for ``float``, a list
  for ``Sequence[int]``, a node with a ``_target_`` where a module or callable is expected
  (checked recursively: normalization steps, the compact sketch, two-stream backbones);
* every value must lie in its range or among its options: :data:`RULES` holds them per
  class and parameter, inherited along the class hierarchy (a rule of ``MatrixStep``
  covers the ``eps`` of every matrix step), :data:`NODE_RULES` the few that involve
  several keys of one node, and :data:`FILE_RULES` those about files a config names
  (checked with ``files=True``, as ``train`` does).

Every failure is one :class:`ConfigError` whose message names the full key, the value and
what is allowed. The structured schema (trainer, paths, root keys) is checked in
``bcnn.config.validate``, which calls :func:`check_node` for each group.
"""

from __future__ import annotations

import collections.abc as cabc
import difflib
import functools
import importlib
import inspect
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import get_object

NoneType = type(None)
SEED_MAX = 2**32 - 1


class ConfigError(ValueError):
    """An invalid config value or key.

    Attributes:
        key: The full dotted key (``pooling.gamma``, ``normalization.sqrt.eps``).
    """

    def __init__(self, key: str, message: str, *, unknown: bool = False) -> None:
        kind = "Unknown config key" if unknown else "Invalid config value for"
        super().__init__(f"{kind} '{key}': {message}")
        self.key = key


def show(value: Any) -> str:
    """A short, readable rendering of a config value for messages."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- rules: ranges and options ------------------------------------------------------------
Rule = Callable[[Any], "str | None"]  # a value -> what is wrong with it, or None


@dataclass(frozen=True)
class Range:
    """A numeric interval; bounds are inclusive (``ge``/``le``) or exclusive (``gt``/``lt``)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def text(self) -> str:
        """``in [0, 1]``, ``> 0``, ``in (0, 1]``..."""
        lo = self.ge if self.ge is not None else self.gt
        hi = self.le if self.le is not None else self.lt
        if lo is not None and hi is not None:
            left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            return f"in {left}{lo}, {hi}{right}"
        if lo is not None:
            return f"{'>=' if self.ge is not None else '>'} {lo}"
        if hi is not None:
            return f"{'<=' if self.le is not None else '<'} {hi}"
        return "any number"

    def __call__(self, value: Any) -> str | None:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # the type check reports these
        ok = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else f"must be {self.text()}, got {show(value)}"


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of options."""

    options: tuple[Any, ...]

    def __call__(self, value: Any) -> str | None:
        if value is None or value in self.options:
            return None
        return f"must be one of {', '.join(map(str, self.options))}; got {show(value)}"


@dataclass(frozen=True)
class OneOfConstant:
    """One of the options a module constant lists (``"bcnn.ops.sqrtm.METHODS"``).

    The constant is read when a value is checked: the modules that define these options
    import the model and data packages, which import this module.
    """

    path: str

    def __call__(self, value: Any) -> str | None:
        module, name = self.path.rsplit(".", 1)
        return OneOf(tuple(getattr(importlib.import_module(module), name)))(value)


@dataclass(frozen=True)
class Each:
    """A rule applied to every element of a list, and optionally its length."""

    rule: Rule
    length: int | None = None
    min_length: int = 0

    def __call__(self, value: Any) -> str | None:
        if not isinstance(value, (list, tuple)):
            return None
        if self.length is not None and len(value) != self.length:
            return f"must be a list of {self.length} values, got {show(value)}"
        if len(value) < self.min_length:
            return f"must list at least {self.min_length} value(s), got {show(value)}"
        for i, item in enumerate(value):
            problem = self.rule(item)
            if problem:
                return f"element {i} {problem}"
        return None


def _weights_file(value: Any) -> str | None:
    """A local weights file that exists and looks like a torch or safetensors file."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        return f"no such file: {path} (pass a .pt/.pth state dict or a .safetensors file)"
    with path.open("rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors":
        # 8-byte little-endian header length, then a JSON header.
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= size <= path.stat().st_size - 8:
            return f"{path} is not a .safetensors file (its header is unreadable)"
        return None
    # torch.save writes a zip archive; files of torch < 1.6 start with a pickle opcode.
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return (
            f"{path} is neither a torch file (.pt/.pth) nor a .safetensors file: pass the "
            "weights of this backbone (see docs/models.md)"
        )
    return None


def _timm_name(value: Any) -> str | None:
    import timm

    if not isinstance(value, str) or timm.is_model(value):
        return None
    close = difflib.get_close_matches(value, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{show(value)} is not a timm model{hint}; see timm.list_models()"


def _lrn(value: Any) -> str | None:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return f"must be [N, kappa, alpha, beta], got {show(value)}"
    n, kappa, alpha, beta = value
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"N (the first element) must be an integer >= 1, got {show(n)}"
    if kappa < 0 or alpha < 0 or beta < 0:
        return f"kappa, alpha and beta must be >= 0, got {show(value)}"
    return None


def _recipe(value: Any) -> str | None:
    if value is None or not isinstance(value, Mapping):
        return None  # the type check reports non-mappings
    from bcnn.data import transforms

    keys = getattr(transforms, "RECIPE_KEYS", None) or transforms._KEYS
    unknown = sorted(set(value) - set(keys))
    if unknown:
        return f"unknown key(s) {unknown}; valid keys: {', '.join(sorted(keys))}"
    if value.get("recipe", "short_side") not in transforms.RECIPES:
        return f"recipe must be one of {', '.join(transforms.RECIPES)}, got {show(value['recipe'])}"
    for key in ("size", "resize"):
        v = value.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 8192):
            return f"{key} must be an integer in [1, 8192], got {show(v)}"
    if "hflip" in value and not isinstance(value["hflip"], bool):
        return f"hflip must be true or false, got {show(value['hflip'])}"
    return None


def _non_empty_string(value: Any) -> str | None:
    return "must not be empty" if isinstance(value, str) and not value.strip() else None


SEED = Range(ge=0, le=SEED_MAX)
POSITIVE_INT = Range(ge=1)
# Widths beyond this are typos, not models (a 65536-channel 1x1 projection of a 2048 map is
# already 134M parameters).
CHANNELS = Range(ge=1, le=65536)


# The options of the matrix square root (``bcnn.ops.sqrtm``, the module: ``bcnn.ops`` exports
# a function of the same name).
_SQRTM: dict[str, Rule] = {
    "method": OneOfConstant("bcnn.ops.sqrtm.METHODS"),
    "backward": OneOfConstant("bcnn.ops.sqrtm.BACKWARDS"),
    "scale": OneOfConstant("bcnn.ops.sqrtm.SCALES"),
    # 0 Newton-Schulz iterations only scale A: a published setting (BMVC 2017 Table 3).
    "iters": Range(ge=0, le=1000),
}

# Ranges and options by class (``module.QualName``) and parameter name.
RULES: dict[str, dict[str, Rule]] = {
    "bcnn.models.backbones.small.SmallCNN": {
        "channels": Each(CHANNELS, min_length=1),
        "in_chans": CHANNELS,
    },
    "bcnn.models.backbones.vgg.VGGM": {"lrn": _lrn},
    "bcnn.models.backbones.timm_backbone.TimmBackbone": {"name": _timm_name},
    "bcnn.models.pooling.PoolingHead": {
        "proj_dim": CHANNELS,
        "proj_lr_scale": Range(ge=0),
        "proj_init": OneOf(("random", "pca")),
        "fit_images": POSITIVE_INT,
    },
    "bcnn.models.pooling.DemocraticHead": {
        "gamma": Range(ge=0, le=1),
        "tau": Range(gt=0, le=1),
        "iters": Range(ge=1, le=1000),
    },
    "bcnn.models.pooling.FisherPool": {
        "num_components": Range(ge=1, le=65536),
        "num_samples": Range(ge=1),
        "samples_per_image": Range(ge=1),
        "em_iters": Range(ge=1, le=100000),
        "seed": SEED,
    },
    "bcnn.ops.compact.TensorSketch": {"out_dim": Range(ge=1, le=2**24), "seed": SEED},
    "bcnn.ops.compact.RandomMaclaurin": {"out_dim": Range(ge=1, le=2**24), "seed": SEED},
    "bcnn.models.normalization.MatrixStep": {
        "eps": Range(ge=0),
        "eps_mode": OneOfConstant("bcnn.models.normalization.EPS_MODES"),
        "floor": Range(gt=0),
    },
    "bcnn.models.normalization.MatrixSqrt": _SQRTM,
    "bcnn.models.normalization.MatrixPower": {
        **{k: v for k, v in _SQRTM.items() if k != "scale"},
        "p": Range(gt=0, le=1),
    },
    "bcnn.models.normalization.MatrixLog": {"method": OneOf(("eigh", "iterative"))},
    "bcnn.models.normalization.SignedPower": {"p": Range(gt=0, le=1), "eps": Range(gt=0)},
    "bcnn.models.normalization.L2Normalize": {"eps": Range(gt=0)},
    "bcnn.models.classifier.LowRankBilinearClassifier": {"rank": Range(ge=1, le=4096)},
    "bcnn.models.classifier.SVMClassifier": {
        "C": Range(gt=0),
        "loss": OneOf(("hinge", "squared_hinge")),
        "tol": Range(gt=0),
        "max_epochs": Range(ge=1),
    },
    "bcnn.data.base.RecordDataset": {
        "val_fraction": Range(ge=0, lt=1),
        "val_seed": SEED,
        "on_bad_image": OneOfConstant("bcnn.data.base.BAD_IMAGE_POLICIES"),
        "transform": _recipe,
        "name": _non_empty_string,
    },
    "bcnn.data.custom._OwnData": {"test_fraction": Range(gt=0, lt=1), "split_seed": SEED},
    "bcnn.data.synthetic.SyntheticDataset": {
        "num_classes": Range(ge=2),
        # num_textons! pairings are enumerated: 8! = 40320 is plenty.
        "num_textons": Range(ge=2, le=8),
        "image_size": Range(ge=1, le=4096),
        "cell_size": Range(ge=1, le=4096),
        "trainval_size": Range(ge=2, le=10**7),
        "test_size": Range(ge=1, le=10**7),
        "val_fraction": Range(ge=0, lt=1),
        "val_seed": SEED,
        "cell_noise": Range(ge=0, le=1),
        "pixel_noise": Range(ge=0),
        "seed": SEED,
        "name": _non_empty_string,
    },
    # torch checks most optimizer arguments itself, but only as "Invalid ... value".
    "torch.optim.optimizer.Optimizer": {
        "momentum": Range(ge=0),
        "dampening": Range(ge=0),
        "weight_decay": Range(ge=0),
        "eps": Range(ge=0),
        "betas": Each(Range(ge=0, lt=1), length=2),
        "alpha": Range(ge=0),
    },
    "torch.optim.lr_scheduler.StepLR": {"step_size": Range(ge=1), "gamma": Range(gt=0)},
    "torch.optim.lr_scheduler.CosineAnnealingLR": {
        "T_max": Range(ge=1),
        "eta_min": Range(ge=0),
    },
    "torch.optim.lr_scheduler.ConstantLR": {
        "factor": Range(gt=0, le=1),
        "total_iters": Range(ge=0),
    },
    "torch.optim.lr_scheduler.ReduceLROnPlateau": {
        "factor": Range(gt=0, lt=1),
        "patience": Range(ge=0),
        "cooldown": Range(ge=0),
        "threshold": Range(ge=0),
        "eps": Range(ge=0),
    },
    "bcnn.engine.loggers.TensorBoardLogger": {
        "flush_secs": Range(ge=1),
        "log_dir": _non_empty_string,
    },
    "bcnn.engine.loggers.WandbLogger": {
        "mode": OneOf(("offline", "online", "disabled")),
        "project": _non_empty_string,
    },
}


def _synthetic_node(node: Mapping[str, Any]) -> tuple[str, str] | None:
    classes, textons = node.get("num_classes"), node.get("num_textons")
    if isinstance(classes, int) and isinstance(textons, int) and classes > math.factorial(textons):
        return (
            "num_classes",
            f"at most num_textons! = {math.factorial(textons)} classes exist with "
            f"num_textons={textons}; got {classes} (raise dataset.num_textons)",
        )
    size, cell = node.get("image_size"), node.get("cell_size")
    if isinstance(size, int) and isinstance(cell, int) and cell > 0 and size % cell:
        return "image_size", f"must be a multiple of cell_size={cell}, got {size}"
    return None


def _weight_source(node: Mapping[str, Any]) -> tuple[str, str] | None:
    if node.get("pretrained") is True and node.get("weights"):
        return (
            "weights",
            "set either pretrained=true (download ImageNet weights) or weights=<file>, "
            f"not both (weights={show(node['weights'])})",
        )
    return None


# Rules about files a config names, applied with ``files=True`` (by ``train``): a config
# may be checked on a machine without them.
FILE_RULES: dict[str, dict[str, Rule]] = {
    "bcnn.models.backbones.base.Backbone": {"weights": _weights_file},
}

# Rules that involve several keys of one node: node (with defaults) -> (key, problem).
NODE_RULES: dict[str, Callable[[Mapping[str, Any]], tuple[str, str] | None]] = {
    "bcnn.data.synthetic.SyntheticDataset": _synthetic_node,
    "bcnn.models.backbones.base.Backbone": _weight_source,
}


def rules() -> dict[str, dict[str, Rule]]:
    """Ranges and options by class and parameter (:data:`RULES`)."""
    return RULES


# ---- signatures and types ------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One parameter of a target: its annotation (evaluated when possible) and default."""

    name: str
    annotation: Any
    required: bool


@dataclass(frozen=True)
class Signature:
    """What a target accepts: named parameters, and the annotation of ``**kwargs`` if any."""

    params: dict[str, Param]
    var_keyword: Any = None  # annotation of **kwargs; None when the target takes none
    takes_var_keyword: bool = False


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"


def _evaluate(annotation: Any, func: Callable) -> Any:
    """A string annotation (``from __future__ import annotations``) -> the type, or Any."""
    if not isinstance(annotation, str):
        return annotation
    module = sys.modules.get(getattr(func, "__module__", ""), None)
    try:
        # Annotations of imported code, not user input.
        return eval(annotation, dict(vars(module)) if module else {})
    except Exception:
        return Any  # an annotation that cannot be evaluated is not judged


def _init_chain(cls: type) -> list[Callable]:
    """``__init__`` of ``cls`` and of the parents it forwards ``**kwargs`` to (same package)."""
    chain: list[Callable] = []
    package = cls.__module__.split(".")[0]
    for c in cls.__mro__:
        if "__init__" not in vars(c):
            continue
        if chain and c.__module__.split(".")[0] != package:
            break
        chain.append(c.__init__)
        kinds = {p.kind for p in inspect.signature(c.__init__).parameters.values()}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            break
    return chain


@functools.cache
def signature(target: Callable) -> Signature:
    """The parameters a target takes from a config node.

    For a class whose ``__init__`` forwards ``**kwargs`` to a parent of the same package
    (the pooling heads' ``**proj``), the parent's parameters are included.
    """
    is_class = inspect.isclass(target)
    funcs = _init_chain(target) if is_class else [target]
    params: dict[str, Param] = {}
    var_keyword: Any = None
    takes_var = False
    for func in funcs:
        takes_var = False
        for i, p in enumerate(inspect.signature(func).parameters.values()):
            if is_class and i == 0:
                continue  # self
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                takes_var, var_keyword = True, _evaluate(p.annotation, func)
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in params:
                required = p.default is inspect.Parameter.empty
                params[p.name] = Param(p.name, _evaluate(p.annotation, func), required)
    return Signature(params, var_keyword if takes_var else None, takes_var)


def is_target_node(value: Any) -> bool:
    """A mapping with a ``_target_`` (what Hydra instantiates)."""
    return isinstance(value, Mapping) and "_target_" in value


_SEQUENCES = (list, tuple, cabc.Sequence, cabc.MutableSequence, cabc.Iterable, cabc.Collection)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def _matches(value: Any, ann: Any) -> bool:
    """Whether a plain config value (after resolution) fits the annotation ``ann``."""
    if ann is Any or ann is inspect.Parameter.empty or isinstance(ann, typing.TypeVar):
        return True
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is typing.Annotated:
        return _matches(value, args[0])
    if ann is None or ann is NoneType:
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str or ann is os.PathLike or origin is os.PathLike:
        return isinstance(value, str)
    if origin in _SEQUENCES or ann in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_matches, value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in _MAPPINGS or ann in _MAPPINGS:
        return isinstance(value, Mapping)
    if origin is cabc.Callable or ann is cabc.Callable or ann is typing.Callable:
        return is_target_node(value)
    if isinstance(ann, type):
        # A module, tensor or other object: only a _target_ node can make one.
        return is_target_node(value)
    return True  # an annotation form we do not judge


def _expected(ann: Any) -> str:
    """What ``ann`` asks for, in words."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Union or origin is types.UnionType:
        parts = list(dict.fromkeys(_expected(a) for a in args))
        return " or ".join(parts)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is typing.Annotated:
        return _expected(args[0])
    if ann is None or ann is NoneType:
        return "null"
    if ann is bool:
        return "true or false"
    if ann is int:
        return "an integer"
    if ann is float:
        return "a finite number"
    if ann is str or ann is os.PathLike or origin is os.PathLike:
        return "a string"
    if origin in _SEQUENCES or ann in _SEQUENCES:
        inner = _expected(args[0]) if args and args[-1] is not Ellipsis else None
        return f"a list ({inner} each)" if inner else "a list"
    if origin in _MAPPINGS or ann in _MAPPINGS:
        return "a mapping"
    name = getattr(ann, "__name__", None)
    return f"a config node with a _target_ ({name})" if name else "a config node with a _target_"


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def _rules_for(target: Any, files: bool) -> tuple[dict[str, list[Rule]], list[Callable]]:
    """Parameter rules and node rules of ``target`` and its base classes."""
    tables = [rules(), FILE_RULES] if files else [rules()]
    chain = target.__mro__ if inspect.isclass(target) else (target,)
    by_param: dict[str, list[Rule]] = {}
    node: list[Callable] = []
    for cls in chain:
        name = _qualname(cls)
        for table in tables:
            for param, rule in table.get(name, {}).items():
                by_param.setdefault(param, []).append(rule)
        if name in NODE_RULES:
            node.append(NODE_RULES[name])
    return by_param, node


def _resolve_target(node: Mapping[str, Any], key: str) -> tuple[Any, Signature]:
    path = node["_target_"]
    if not isinstance(path, str):
        raise ConfigError(f"{key}._target_", f"must be a dotted import path, got {show(path)}")
    try:
        target = get_object(path)
    except Exception as err:
        raise ConfigError(f"{key}._target_", f"cannot import {path!r} ({err})") from None
    if not callable(target):
        raise ConfigError(f"{key}._target_", f"{path!r} is not a class or function")
    return target, signature(target)


def check_node(
    node: Mapping[str, Any],
    key: str,
    provided: Iterable[str] = (),
    base: type | None = None,
    files: bool = False,
) -> None:
    """Checks one resolved config node with a ``_target_`` (and its nested nodes).

    Args:
        node: The node as plain containers (``OmegaConf.to_container(..., resolve=True)``).
        key: Its full dotted key, for messages (``pooling``, ``normalization.sqrt``).
        provided: Parameters bcnn passes itself; setting them in the config is an error.
        base: A class the target must be (or subclass), e.g. a normalization ``Step``.
        files: Also check the files the node names (backbone weights exist and look like
            weights); off for configs checked away from the machine that runs them.

    Raises:
        ConfigError: the first problem, naming the full key, the value and what is allowed.
    """
    if not is_target_node(node):
        raise ConfigError(key, f"must be a config node with a _target_, got {show(node)}")
    target, sig = _resolve_target(node, key)
    if base is not None and inspect.isclass(target) and not issubclass(target, base):
        raise ConfigError(
            f"{key}._target_",
            f"{node['_target_']} is not a {base.__name__} (expected a subclass of "
            f"{_qualname(base)})",
        )
    provided = set(provided)
    partial = bool(node.get("_partial_", False))
    param_rules, node_rules = _rules_for(target, files)
    values = {k: v for k, v in node.items() if not str(k).startswith("_")}
    for name, value in values.items():
        full = f"{key}.{name}"
        if name in provided:
            raise ConfigError(
                full, "is set by bcnn when the object is built; remove it from the config"
            )
        param = sig.params.get(name)
        if param is None:
            if not sig.takes_var_keyword:
                valid = sorted(set(sig.params) - provided)
                close = difflib.get_close_matches(str(name), valid, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(
                    full,
                    f"{_qualname(target)} takes no such argument{hint}; valid keys: "
                    f"{', '.join(valid) or '(none)'}",
                    unknown=True,
                )
            # Nodes taken through **kwargs are built by the target with what it was given
            # (the logger backends get the run directory too).
            _check_value(value, sig.var_keyword, full, [], files, provided)
            continue
        _check_value(value, param.annotation, full, param_rules.get(name, []), files)
    if not partial:
        missing = [
            n for n, p in sig.params.items() if p.required and n not in values and n not in provided
        ]
        if missing:
            raise ConfigError(f"{key}.{missing[0]}", "is required but missing from the config")
    if node_rules:
        defaults = _defaults(target)
        for rule in node_rules:
            found = rule({**defaults, **values})
            if found:
                raise ConfigError(f"{key}.{found[0]}", found[1])


def _defaults(target: Any) -> dict[str, Any]:
    try:
        fn = target.__init__ if inspect.isclass(target) else target
        return {
            n: p.default
            for n, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
    except (TypeError, ValueError):
        return {}


def _node_base(ann: Any) -> type | None:
    """The class a ``_target_`` node must produce for annotation ``ann`` (Step, Backbone)."""
    candidates = [ann, *typing.get_args(ann)]
    plain = (NoneType, bool, int, float, str, dict, list, tuple, Any)
    for c in candidates:
        if isinstance(c, type) and c not in plain:
            return c
    return None


def _check_value(
    value: Any,
    ann: Any,
    key: str,
    value_rules: list[Rule],
    files: bool = False,
    provided: Iterable[str] = (),
) -> None:
    if value == "???":
        raise ConfigError(key, "is required but has no value (???)")
    if is_target_node(value):
        if not _matches(value, ann):
            raise ConfigError(key, f"must be {_expected(ann)}, got a config node")
        base = _node_base(ann)
        if base is not None and base.__module__.startswith("torch"):
            base = None  # nn.Module, Tensor: any target will do
        check_node(value, key, provided, base=base, files=files)
        return
    if not _matches(value, ann):
        raise ConfigError(key, f"must be {_expected(ann)}, got {show(value)}")
    if _non_finite(value):
        raise ConfigError(key, f"must be finite, got {show(value)}")
    for rule in value_rules:
        problem = rule(value)
        if problem:
            raise ConfigError(key, problem)
