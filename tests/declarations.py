"""Both sides of a declared limit, read from the declaration (for tests/test_limits.py and
tests/test_fuzz_config.py).

``violations(ann)`` gives values just outside what an annotation declares (a bound crossed,
an option that does not exist, ``'yes'`` for a boolean); ``valid_values(ann)`` gives small
values inside it (inclusive bounds, values just inside exclusive ones, every option,
``None`` where optional, both booleans). A :class:`~bcnn.limits.Check` is a function, not a
bound: its values on each side are listed below, by function.
"""

from __future__ import annotations

import collections.abc as cabc
import math
import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from annotated_types import Ge, GroupedMetadata, Gt, Le, Len, Lt, MinLen

from bcnn.config import _distinct, device_problem
from bcnn.limits import Check, Seed, non_empty, problem, writable_dir

# Integer bounds above this are sizes (channels, pixels, images): values up there are the
# memory plan's to refuse or accept (issue 20, item 8), not drawn as "valid" here.
SMALL_BOUND = 1024
# Values outside each Check; paths need the file checks (``files=True``).
CHECK_VIOLATIONS: dict[Any, tuple[Any, ...]] = {
    non_empty: (" ",),
    writable_dir: ("/dev/null", "/proc/nonexistent/x", "/dev/null/x"),
    device_problem: ("tpu", "cpu:1", "cuda:99"),
    _distinct: (["linear", "linear"],),
}
# Values inside each Check; GENERATED: every value of the type and bounds passes it.
GENERATED = object()
CHECK_VALUES: dict[Any, Any] = {
    non_empty: ("my_set",),
    device_problem: ("cpu", "auto"),
    _distinct: GENERATED,
}


def _metadata(ann: Any) -> list[Any]:
    """``Annotated`` metadata, ``Interval(ge=0, le=1)`` split into ``Ge(0), Le(1)``."""
    flat: list[Any] = []
    for meta in ann.__metadata__:
        flat.extend(meta if isinstance(meta, GroupedMetadata) else [meta])
    return flat


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _sequence_item(ann: Any) -> Any:
    """The item annotation of a list-like annotation (``Sequence[int]``), else None."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    return args[0] if origin in (list, cabc.Sequence) and args else None


def violations(ann: Any, files: bool = False) -> Iterator[Any]:
    """Values just outside what ``ann`` declares (with ``files``: also paths the file
    checks refuse)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if _is_union(origin):
        for arm in args:
            yield from (v for v in violations(arm, files) if problem(v, ann, files) is not None)
        return
    if origin is Annotated:
        base, integer = args[0], args[0] is int
        for m in _metadata(ann):
            if isinstance(m, Ge):
                yield m.ge - 1 if integer else m.ge - max(abs(m.ge), 1) * 0.5
            elif isinstance(m, Gt):
                yield m.gt
            elif isinstance(m, Le):
                yield m.le + 1 if integer else m.le * 2 + 1
            elif isinstance(m, Lt):
                yield m.lt
            elif isinstance(m, MinLen) and m.min_length > 0:
                yield []
            elif isinstance(m, Check) and (files or not m.files):
                yield from CHECK_VIOLATIONS.get(m.fn, ())
        yield from violations(base, files)
        return
    item = _sequence_item(ann)
    if item is not None:
        yield from ([bad] for bad in violations(item, files))
    elif origin is tuple and args and args[-1] is not Ellipsis:
        good = [valid_values(a)[:1] for a in args]
        for i, arm in enumerate(args):
            for bad in violations(arm, files):
                if all(good):
                    yield [bad if j == i else g[0] for j, g in enumerate(good)]
    elif origin is Literal:
        yield "not-an-option"
    elif ann is bool:
        yield "yes"
    elif ann is int:
        yield 1.5
    elif ann is float:
        yield math.nan


def _inside(bound: float, integer: bool, up: bool) -> float:
    """The value just inside an exclusive bound."""
    step = 1 if integer else max(abs(bound), 1) * 1e-3
    return bound - step if up else bound + step


def _numbers(ann: Any, base: type) -> list[Any]:
    integer = base is int
    lows, highs = [], []
    for m in _metadata(ann):
        if isinstance(m, Ge):
            lows.append(m.ge)
        elif isinstance(m, Gt):
            lows.append(_inside(m.gt, integer, up=False))
        elif isinstance(m, Le):
            highs.append(m.le)
        elif isinstance(m, Lt):
            highs.append(_inside(m.lt, integer, up=True))
    # A large integer bound is a size: the memory plan's (a seed's is only a number).
    highs = [h for h in highs if not integer or h <= SMALL_BOUND or ann == Seed]
    found = [*lows, *highs] or [1 if integer else 1.0]
    return [base(v) for v in found]


def _checked_values(ann: Any, generated: list[Any], listing: dict[Any, Any]) -> list[Any]:
    """The values that the Checks of ``ann`` let through: their own, or ``generated`` (from
    the type and bounds) where they pass every such value."""
    for m in _metadata(ann):
        if isinstance(m, Check):
            listed = listing.get(m.fn)
            if listed is None:
                return []  # a check we hold no values for: only the config's own value
            if listed is not GENERATED:
                generated = list(listed)
    return generated


def valid_values(ann: Any, examples: dict[Any, Any] | None = None) -> list[Any]:
    """Small values inside what ``ann`` declares: inclusive bounds, values just inside
    exclusive ones (not large sizes: see ``SMALL_BOUND``), every option, ``None`` where
    optional, both booleans. ``examples`` adds values for Checks (a writable directory)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    found: list[Any] = []
    if _is_union(origin):
        for arm in args:
            found += valid_values(arm, examples)
    elif origin is Annotated:
        base = args[0]
        if base in (int, float):
            found = _numbers(ann, base)
        else:
            found = valid_values(base, examples)
            lengths = [m for m in _metadata(ann) if isinstance(m, (MinLen, Len))]
            if lengths and _sequence_item(base) is not None:
                items = [v[0] for v in found if v]
                found = [[v] * max(lengths[0].min_length, 1) for v in items]
        found = _checked_values(ann, found, {**CHECK_VALUES, **(examples or {})})
    elif origin is Literal:
        found = list(args)
    elif ann is bool:
        found = [True, False]
    elif ann is None or ann is type(None):
        found = [None]
    elif ann is int:
        found = [1]
    elif ann is float:
        found = [1.0]
    elif _sequence_item(ann) is not None:
        found = [[v] for v in valid_values(_sequence_item(ann), examples)[:2]]
    elif origin is tuple and args and args[-1] is not Ellipsis:
        items = [valid_values(a, examples)[:1] for a in args]
        found = [[i[0] for i in items]] if all(items) else []
    unique: list[Any] = []
    for v in found:
        if not any(v == u and type(v) is type(u) for u in unique):
            unique.append(v)
    return unique
