"""Limits declared once, on the parameter, and the one checker that reads them.

A parameter's valid values are written in its annotation: the type, ``Literal[...]`` for
options, and ``annotated_types`` bounds for ranges and lengths::

    def __init__(self, gamma: Annotated[float, Interval(ge=0, le=1)] = 0.5,
                 method: Literal["eigh", "iterative"] = "eigh") -> None: ...

Three readers use the same declaration:

* up-front validation (``bcnn.config.validate``) calls :func:`check_node` on every config
  node with a ``_target_``, before any data or model work, naming the full config key;
* constructors decorated with :func:`checked` check their arguments when called from
  Python;
* the config fuzz test draws its valid and invalid values from them.

:class:`Check` adds a check no bound expresses (a timm model name, a weights file); a
class's ``config_problem(values)`` static method checks several of its values together
(``num_classes <= num_textons!``), and its ``passes`` names the arguments it gives a nested
node itself (a config may not set them). Every failure is one
:class:`~bcnn.errors.ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import difflib
import functools
import inspect
import math
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from annotated_types import (
    BaseMetadata,
    Ge,
    GroupedMetadata,
    Gt,
    Interval,
    Le,
    Len,
    Lt,
    MaxLen,
    MinLen,
)

from bcnn.errors import ConfigError, show

NoneType = type(None)
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Check(BaseMetadata):
    """A check no bound expresses: ``fn(value)`` returns what is wrong, or None.

    Attributes:
        fn: The check.
        files: It reads the file system (a weights file): skipped when a config is
            validated away from the machine that runs it (``files=False``).
    """

    fn: Callable[[Any], str | None]
    files: bool = False


@dataclass(frozen=True)
class Fields(BaseMetadata):
    """A mapping whose keys are fields of the dataclass ``schema`` and whose values fit
    their annotations (and, together, the schema's ``config_problem``)."""

    schema: type


# Shared declarations.
Seed = Annotated[int, Interval(ge=0, le=SEED_MAX)]
PositiveInt = Annotated[int, Ge(1)]
Positive = Annotated[float, Gt(0)]
NonNegative = Annotated[float, Ge(0)]
Fraction = Annotated[float, Interval(ge=0, lt=1)]  # a share held out
# Widths beyond this are typos, not models (a 65536-channel 1x1 projection of a 2048 map is
# already 134M parameters).
Channels = Annotated[int, Interval(ge=1, le=65536)]


def non_empty(value: Any) -> str | None:
    """A :class:`Check`: a string that is not blank."""
    return "must not be empty" if isinstance(value, str) and not value.strip() else None


NonEmpty = Annotated[str, Check(non_empty)]


def writable_dir(path: Any) -> str | None:
    """What stops a run from creating and writing the directory ``path``, or None.

    Creates the directory (the run would) and writes and removes a probe file in it: the
    only test that holds for every user, root included, and every file system.
    """
    if path is None:
        return None
    folder = Path(str(path)).expanduser()
    if folder.exists() and not folder.is_dir():
        return f"{folder} is not a directory; choose another"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".bcnn-probe-"):
            pass
    except OSError as err:
        return (
            f"cannot create or write the directory {folder} ({err.strerror or err}); choose another"
        )
    return None


WritableDir = Annotated[str, Check(non_empty), Check(writable_dir, files=True)]


# ---- bounds ---------------------------------------------------------------------------------
def _bounds(meta: Any) -> Iterable[Any]:
    """``Interval(ge=0, le=1)`` -> ``Ge(0), Le(1)``; other metadata as it is."""
    if isinstance(meta, GroupedMetadata):
        yield from meta
    else:
        yield meta


def _range_text(metas: list[Any]) -> str:
    """``in [0, 1]``, ``> 0``, ``in (0, 1]``... for the bounds among ``metas``."""
    lo = next((m for m in metas if isinstance(m, (Ge, Gt))), None)
    hi = next((m for m in metas if isinstance(m, (Le, Lt))), None)
    lo_v = None if lo is None else (lo.ge if isinstance(lo, Ge) else lo.gt)
    hi_v = None if hi is None else (hi.le if isinstance(hi, Le) else hi.lt)
    if lo is not None and hi is not None:
        left, right = "[" if isinstance(lo, Ge) else "(", "]" if isinstance(hi, Le) else ")"
        return f"in {left}{lo_v}, {hi_v}{right}"
    if lo is not None:
        return f"{'>=' if isinstance(lo, Ge) else '>'} {lo_v}"
    return f"{'<=' if isinstance(hi, Le) else '<'} {hi_v}"


def _within(value: Any, meta: Any) -> bool:
    if isinstance(meta, Ge):
        return value >= meta.ge
    if isinstance(meta, Gt):
        return value > meta.gt
    if isinstance(meta, Le):
        return value <= meta.le
    return value < meta.lt  # Lt


def _meta_problem(value: Any, metadata: tuple[Any, ...], files: bool) -> str | None:
    """What of ``metadata`` (bounds, lengths, checks) ``value`` breaks, or None."""
    metas = [m for meta in metadata for m in _bounds(meta)]
    ranges = [m for m in metas if isinstance(m, (Ge, Gt, Le, Lt))]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ranges and number and not all(_within(value, m) for m in ranges):
        return f"must be {_range_text(ranges)}, got {show(value)}"
    for m in metas:
        if isinstance(m, (MinLen, MaxLen, Len)) and isinstance(value, (list, tuple)):
            lo = m.min_length if isinstance(m, (MinLen, Len)) else 0
            hi = m.max_length if isinstance(m, (MaxLen, Len)) else None
            if len(value) < lo or (hi is not None and len(value) > hi):
                count = f"{lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
                return f"must list {count} value(s), got {show(value)}"
        elif isinstance(m, Check) and (files or not m.files):
            found = m.fn(value)
            if found:
                return found
        elif isinstance(m, Fields) and isinstance(value, Mapping):
            found = _fields_problem(value, m.schema, files)
            if found:
                return found
    return None


def _fields_problem(value: Mapping[str, Any], schema: type, files: bool) -> str | None:
    hints = typing.get_type_hints(schema, include_extras=True)
    fields = [f.name for f in dataclasses.fields(schema)]
    unknown = sorted(set(value) - set(fields))
    if unknown:
        return f"unknown key(s) {unknown}; valid keys: {', '.join(fields)}"
    for name, item in value.items():
        found = problem(item, hints[name], files)
        if found:
            return f"{name} {found}"
    node = _node_problem(schema, value)
    return f"{node[0]} {node[1]}" if node else None


# ---- types ----------------------------------------------------------------------------------
_SEQUENCES = (list, tuple, cabc.Sequence, cabc.MutableSequence, cabc.Iterable, cabc.Collection)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def is_target_node(value: Any) -> bool:
    """A mapping with a ``_target_`` (what Hydra instantiates)."""
    return isinstance(value, Mapping) and "_target_" in value


def expected(ann: Any) -> str:
    """What the annotation ``ann`` asks for, in words."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(dict.fromkeys(expected(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is Annotated:
        return expected(args[0])
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    if ann is None or ann is NoneType:
        return "null"
    if ann in words:
        return words[ann]
    if ann is os.PathLike or origin is os.PathLike:
        return "a string"
    if origin in _SEQUENCES or ann in _SEQUENCES:
        inner = expected(args[0]) if args and args[-1] is not Ellipsis else None
        return f"a list ({inner} each)" if inner else "a list"
    if origin in _MAPPINGS or ann in _MAPPINGS:
        return "a mapping"
    name = getattr(ann, "__name__", None)
    return f"a config node with a _target_ ({name})" if name else "a config node with a _target_"


def _is_free(ann: Any) -> bool:
    return ann is Any or ann is inspect.Parameter.empty or isinstance(ann, TypeVar)


def problem(value: Any, ann: Any, files: bool = False) -> str | None:
    """What is wrong with a plain config value for the annotation ``ann``, or None.

    Checks the type (an integer for ``int``, not 1.5; ``true``/``false`` for ``bool``, not
    ``'yes'``; a finite number for ``float``; a list for sequences, element by element; a
    node with a ``_target_`` where an object is expected), ``Literal`` options and the
    ``annotated_types`` bounds and :class:`Check` s of ``Annotated`` metadata.

    Args:
        value: The value, resolved to plain containers.
        ann: The parameter's annotation (evaluated).
        files: Also run the checks that read files.
    """
    if _is_free(ann):
        return None
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Union or origin is types.UnionType:
        found = [problem(value, a, files) for a in args]
        if None in found:
            return None
        # The arm whose type fits names the bound that failed; else the types are listed.
        typed = [p for p, a in zip(found, args) if _fits(value, a)]
        return typed[0] if typed else f"must be {expected(ann)}, got {show(value)}"
    if origin is Annotated:
        return problem(value, args[0], files) or _meta_problem(value, ann.__metadata__, files)
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return None
        return f"must be one of {', '.join(map(str, args))}; got {show(value)}"
    if not _fits(value, ann):
        return f"must be {expected(ann)}, got {show(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be finite, got {show(value)}"
    if (origin in _SEQUENCES or ann in _SEQUENCES) and args:
        fixed = origin is tuple and args[-1] is not Ellipsis
        inner = args if fixed else (args[0],) * len(value)
        for i, (item, item_ann) in enumerate(zip(value, inner)):
            item_problem = problem(item, item_ann, files)
            if item_problem:
                return f"element {i} {item_problem}"
    return None


def _fits(value: Any, ann: Any) -> bool:
    """Whether ``value``'s type fits ``ann`` (bounds aside)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if _is_free(ann):
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_fits(value, a) for a in args)
    if origin is Annotated:
        return _fits(value, args[0])
    if origin is typing.Literal:
        return any(type(value) is type(a) for a in args)
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
        return origin is not tuple or not args or args[-1] is Ellipsis or len(value) == len(args)
    if origin in _MAPPINGS or ann in _MAPPINGS:
        return isinstance(value, Mapping)
    if origin is cabc.Callable or ann is cabc.Callable or isinstance(ann, type):
        # A module, tensor or other object: only a _target_ node can make one.
        return is_target_node(value)
    return True  # an annotation form we do not judge


# ---- signatures -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One parameter of a target: its annotation (evaluated) and its default, if any."""

    name: str
    annotation: Any
    default: Any = inspect.Parameter.empty

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@dataclass(frozen=True)
class Signature:
    """What a target accepts: named parameters, and the annotation of ``**kwargs`` if any."""

    params: dict[str, Param]
    var_keyword: Any = None
    takes_var_keyword: bool = False


@functools.cache
def _hints(func: Callable) -> dict[str, Any]:
    """Evaluated annotations of ``func`` (with ``Annotated`` metadata kept)."""
    func = inspect.unwrap(func)
    try:
        return typing.get_type_hints(func, include_extras=True)
    except Exception:
        # An annotation that cannot be evaluated here is not judged.
        module = sys.modules.get(getattr(func, "__module__", ""), None)
        found: dict[str, Any] = {}
        for name, ann in getattr(func, "__annotations__", {}).items():
            try:
                found[name] = eval(ann, dict(vars(module))) if isinstance(ann, str) else ann
            except Exception:
                found[name] = Any
        return found


def _init_chain(cls: type) -> list[Callable]:
    """``__init__`` of ``cls`` and of the parents it forwards ``**kwargs`` to (same package)."""
    chain: list[Callable] = []
    package = cls.__module__.split(".")[0]
    for c in cls.__mro__:
        if "__init__" not in vars(c):
            continue
        if chain and c.__module__.split(".")[0] != package:
            break
        init = vars(c)["__init__"]
        chain.append(init)
        kinds = {p.kind for p in inspect.signature(init).parameters.values()}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            break
    return chain


@functools.cache
def signature(target: Callable) -> Signature:
    """The parameters a target takes from a config node (annotations evaluated).

    For a class whose ``__init__`` forwards ``**kwargs`` to a parent of the same package
    (the pooling heads' ``**proj``), the parent's parameters are included.
    """
    is_class = inspect.isclass(target)
    params: dict[str, Param] = {}
    var_keyword: Any = None
    takes_var = False
    for func in _init_chain(target) if inspect.isclass(target) else [target]:
        hints, takes_var = _hints(func), False
        for i, p in enumerate(inspect.signature(func).parameters.values()):
            if is_class and i == 0:
                continue  # self
            ann = hints.get(p.name, Any)
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                takes_var, var_keyword = True, ann
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in params:
                params[p.name] = Param(p.name, ann, p.default)
    return Signature(params, var_keyword if takes_var else None, takes_var)


def _node_problem(target: Any, values: Mapping[str, Any]) -> tuple[str, str] | None:
    """The class's own check of several values together (``config_problem``), if any, on
    the values with the defaults of those not given."""
    rule = getattr(target, "config_problem", None)
    if not callable(rule):
        return None
    given = {n: p.default for n, p in signature(target).params.items() if not p.required}
    return rule({**given, **values})


# ---- config nodes and constructors ----------------------------------------------------------
def check_node(
    node: Mapping[str, Any],
    key: str,
    provided: Iterable[str] = (),
    base: type | None = None,
    files: bool = False,
) -> None:
    """Checks one resolved config node with a ``_target_`` (and its nested nodes).

    Every key must be a parameter of the target (keys bcnn passes itself, ``provided``,
    may not be set); every value must fit the parameter's annotation; required parameters
    must be present (unless ``_partial_``); the target's ``config_problem`` must accept the
    values together.

    Args:
        node: The node as plain containers (``OmegaConf.to_container(..., resolve=True)``).
        key: Its full dotted key, for messages (``pooling``, ``normalization.sqrt``).
        provided: Parameters bcnn passes itself.
        base: A class the target must be (or subclass), e.g. a normalization ``Step``.
        files: Also run the checks that read files (``backbone.weights`` exists).

    Raises:
        ConfigError: the first problem, naming the full key, the value and what is allowed.
    """
    from hydra.utils import get_object

    if not is_target_node(node):
        raise ConfigError(key, f"must be a config node with a _target_, got {show(node)}")
    path = node["_target_"]
    if not isinstance(path, str):
        raise ConfigError(f"{key}._target_", f"must be a dotted import path, got {show(path)}")
    try:
        target = get_object(path)
    except Exception as err:
        raise ConfigError(f"{key}._target_", f"cannot import {path!r} ({err})") from None
    if not callable(target):
        raise ConfigError(f"{key}._target_", f"{path!r} is not a class or function")
    if base is not None and inspect.isclass(target) and not issubclass(target, base):
        raise ConfigError(
            f"{key}._target_",
            f"{path} is not a {base.__name__} (expected a subclass of "
            f"{base.__module__}.{base.__qualname__})",
        )
    sig, provided = signature(target), set(provided)
    values = {k: v for k, v in node.items() if not str(k).startswith("_")}
    for name, value in values.items():
        full = f"{key}.{name}"
        if name in provided:
            raise ConfigError(
                full, "is set by bcnn when the object is built; remove it from the config"
            )
        param = sig.params.get(name)
        if param is None and not sig.takes_var_keyword:
            valid = sorted(set(sig.params) - provided)
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                full,
                f"{target.__module__}.{target.__qualname__} takes no such argument{hint}; "
                f"valid keys: {', '.join(valid) or '(none)'}",
                unknown=True,
            )
        # Nodes taken through **kwargs are built by the target with what it was given (the
        # logger backends get the run directory too).
        ann = sig.var_keyword if param is None else param.annotation
        passes = getattr(target, "passes", {}).get(name, ())  # what it gives a nested node
        check_value(value, ann, full, files, provided if param is None else passes)
    if not node.get("_partial_", False):
        missing = [n for n, p in sig.params.items() if p.required and n not in values]
        missing = [n for n in missing if n not in provided]
        if missing:
            raise ConfigError(f"{key}.{missing[0]}", "is required but missing from the config")
    found = _node_problem(target, values)
    if found:
        raise ConfigError(f"{key}.{found[0]}", found[1])


def _node_base(ann: Any) -> type | None:
    """The class a ``_target_`` node must produce for annotation ``ann`` (Step, Backbone)."""
    plain = (NoneType, bool, int, float, str, dict, list, tuple, Any)
    for c in (ann, *typing.get_args(ann)):
        if isinstance(c, type) and c not in plain and not c.__module__.startswith("torch"):
            return c  # nn.Module, Tensor: any target will do
    return None


def check_value(
    value: Any, ann: Any, key: str, files: bool = False, provided: Iterable[str] = ()
) -> None:
    """Checks one value (a nested ``_target_`` node recursively) against its annotation.

    Raises:
        ConfigError: naming ``key``, the value and what is allowed.
    """
    if value == "???":
        raise ConfigError(key, "is required but has no value (???)")
    if is_target_node(value):
        if not _fits(value, ann):
            raise ConfigError(key, f"must be {expected(ann)}, got a config node")
        check_node(value, key, provided, base=_node_base(ann), files=files)
        return
    found = problem(value, ann, files)
    if found:
        raise ConfigError(key, found)


def checked(init: Callable) -> Callable:
    """Decorates an ``__init__`` so that its arguments are checked against its annotations.

    The error names ``<Class>.<parameter>``: a config is checked earlier, by
    :func:`check_node`, with its full key. Objects (modules, tensors) passed where a config
    would give a node are not judged. The class's ``config_problem`` is asked once, by the
    first checked ``__init__`` along the MRO.
    """
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        hints = _hints(init)
        values: dict[str, Any] = {}
        for param, value in list(sig.bind(self, *args, **kwargs).arguments.items())[1:]:
            if sig.parameters[param].kind is inspect.Parameter.VAR_KEYWORD:
                values.update(value)  # checked by the parent's __init__ it goes to
                continue
            values[param] = value
            # Files are the body's to read: it raises FileNotFoundError & co. naming them.
            found = problem(value, hints.get(param, Any)) if _plain(value) else None
            if found:
                raise ConfigError(f"{type(self).__name__}.{param}", found)
        if _outermost(type(self)) is wrapper:
            found_node = _node_problem(type(self), values)
            if found_node:
                raise ConfigError(f"{type(self).__name__}.{found_node[0]}", found_node[1])
        init(self, *args, **kwargs)

    wrapper._checked = True  # type: ignore[attr-defined]
    return wrapper


def _outermost(cls: type) -> Callable | None:
    """The first checked ``__init__`` along ``cls``'s MRO: the one that sees every value."""
    for c in cls.__mro__:
        init = vars(c).get("__init__")
        if getattr(init, "_checked", False):
            return init
    return None


def _plain(value: Any) -> bool:
    """A value a config could hold (numbers, strings, lists of them), not an object."""
    if type(value) in (list, tuple):  # not a NamedTuple: an object
        return all(map(_plain, value))
    return value is None or isinstance(value, (bool, int, float, str, Mapping))
