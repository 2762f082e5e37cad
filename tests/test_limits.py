"""Limits declared once, on the parameter: the checker, and its two readers agreeing.

Every bound, option and type declared on a config class is probed from the declaration
itself: a value just outside it must be refused by up-front validation (naming the config
key) and by the constructor (naming the class and parameter), before any work.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import torch
from annotated_types import Ge, Gt, Interval, Le, Lt, MinLen
from hydra.errors import ConfigCompositionException
from hydra.utils import get_object
from omegaconf import OmegaConf

from bcnn.config import GROUP_ARGS, TrainerConfig, validate
from bcnn.errors import ConfigError
from bcnn.limits import Check, Fields, check_node, checked, problem, signature
from bcnn.models.shapes import FeatureShape
from tests.conftest import CONFIG_DIR, compose_config
from tests.declarations import violations


# ---- the checker --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "ann", "expected"),
    [
        (3, Annotated[int, Ge(1)], None),
        (0, Annotated[int, Ge(1)], "must be >= 1, got 0"),
        (1.5, Annotated[int, Ge(1)], "must be an integer, got 1.5"),
        (True, int, "must be an integer, got True"),
        ("yes", bool, "must be true or false, got 'yes'"),
        (1, float, None),
        (float("nan"), float, "must be finite, got nan"),
        (0.0, Annotated[float, Interval(gt=0, le=1)], "must be in (0, 1], got 0.0"),
        (1.0, Annotated[float, Lt(1)], "must be < 1, got 1.0"),
        (2, Annotated[float, Le(1)], "must be <= 1, got 2"),
        ("svd", Literal["eigh", "svd"], None),
        ("qr", Literal["eigh", "svd"], "must be one of eigh, svd; got 'qr'"),
        (None, Annotated[int, Ge(1)] | None, None),
        (0, Annotated[int, Ge(1)] | None, "must be >= 1, got 0"),
        ("x", Annotated[int, Ge(1)] | None, "must be an integer or null, got 'x'"),
        ([], Annotated[list[int], MinLen(1)], "must list at least 1 value(s), got []"),
        ([1, 0], list[Annotated[int, Gt(0)]], "element 1 must be > 0, got 0"),
        ((0.5, 2.0), tuple[float, Annotated[float, Lt(1)]], "element 1 must be < 1, got 2.0"),
        ("a", Annotated[str, Check(lambda v: "no" if v == "a" else None)], "no"),
    ],
)
def test_problem_reads_types_options_bounds_and_checks(value: Any, ann: Any, expected: Any):
    assert problem(value, ann) == expected


def test_file_checks_run_only_when_asked() -> None:
    ann = Annotated[str, Check(lambda v: "missing", files=True)]
    assert problem("x", ann) is None and problem("x", ann, files=True) == "missing"


@dataclasses.dataclass
class _Schema:
    size: Annotated[int, Ge(1)] = 4
    mode: Literal["a", "b"] = "a"

    @staticmethod
    def config_problem(values: dict) -> tuple[str, str] | None:
        return (
            ("size", "odd with mode b")
            if values.get("mode") == "b" and values["size"] % 2
            else None
        )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"size": 2}, None),
        ({"size": 0}, "size must be >= 1, got 0"),
        ({"sise": 2}, "unknown key(s) ['sise']; valid keys: size, mode"),
        ({"size": 3, "mode": "b"}, "size odd with mode b"),
    ],
)
def test_fields_checks_a_mapping_against_a_dataclass(value: dict, expected: Any) -> None:
    assert problem(value, Annotated[dict, Fields(_Schema)]) == expected


class _Part:
    @checked
    def __init__(self, n: Annotated[int, Ge(1)] = 1, **rest: Any) -> None:
        self.n = n

    @staticmethod
    def config_problem(values: dict) -> tuple[str, str] | None:
        return ("k", "must not exceed n") if values.get("k", 0) > values["n"] else None


class _Child(_Part):
    @checked
    def __init__(self, k: Annotated[int, Ge(0)] = 0, **rest: Any) -> None:
        super().__init__(**rest)


def test_checked_constructors_check_their_own_and_forwarded_arguments() -> None:
    assert _Child(k=1, n=2).n == 2
    with pytest.raises(ConfigError, match=r"'_Child\.n': must be >= 1, got 0"):
        _Child(n=0)
    with pytest.raises(ConfigError, match=r"'_Child\.k': must not exceed n"):
        _Child(k=3, n=2)  # asked once, with every value, by the outermost constructor
    assert signature(_Child).params.keys() == {"k", "n"}


# ---- every declaration, through both readers -----------------------------------------------
def _declared(target: Any, provided: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    for name, param in signature(target).params.items():
        if name not in provided:
            for value in violations(param.annotation):
                yield name, value


OPTIONS = [
    (group, path.stem)
    for group in GROUP_ARGS
    for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
    if not path.stem.startswith("_")
]
# Arguments bcnn passes itself, as the constructors get them.
BUILT = {
    "pooling": {"in_channels": 8},
    "classifier": {"in_features": FeatureShape((8,)), "num_classes": 2},
    "dataset": {"split": "train", "augment": False},
}


def _probe(node: dict, key: str, provided: tuple[str, ...], built: dict, tmp: Path) -> int:
    """Probes every declared limit of ``node`` and its nested nodes; returns how many."""
    target = get_object(node["_target_"])
    required = {n for n, p in signature(target).params.items() if p.required}
    probed = 0
    for name, value in _declared(target, provided):
        bad = {**node, name: value}
        with pytest.raises(ConfigError) as up_front:
            check_node(bad, key, provided)
        assert up_front.value.key == f"{key}.{name}", (name, value, up_front.value)
        args = {k: v for k, v in bad.items() if not k.startswith("_")} | built
        if required <= set(args):  # a partial node gets the rest from its caller
            with pytest.raises(ConfigError) as by_constructor:
                target(**args)
            assert by_constructor.value.key.endswith(f".{name}"), (name, value, by_constructor)
        probed += 1
    for name, sub in node.items():
        if isinstance(sub, dict) and "_target_" in sub:
            probed += _probe(sub, f"{key}.{name}", (), {}, tmp)
    return probed


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_declared_limit_is_refused_up_front_and_by_the_constructor(
    group: str, option: str, tmp_path: Path
) -> None:
    cfg = compose_config([f"{group}={option}"], tmp_path)
    node = OmegaConf.to_container(cfg[group], resolve=True)
    node = {k: str(tmp_path) if v == "???" else v for k, v in node.items()}  # dataset.root
    if group == "logger":
        nodes = {f"logger.{k}": v for k, v in node.items()} if "_target_" not in node else {}
        nodes = nodes or {"logger": node}
        built = {"output_dir": tmp_path, "run_config": None}
    else:
        nodes, built = {group: node}, BUILT.get(group, {})
    probed = sum(_probe(n, k, GROUP_ARGS[group], built, tmp_path) for k, n in nodes.items())
    assert probed or option in ("csv", "none", "l2"), f"{group}={option} declares no limits"


def test_every_trainer_limit_is_refused_up_front(tmp_path: Path) -> None:
    hints = typing.get_type_hints(TrainerConfig, include_extras=True)
    stage_hints = typing.get_type_hints(type(TrainerConfig().linear), include_extras=True)
    keys = [(f"trainer.{k}", a) for k, a in hints.items() if not dataclasses.is_dataclass(a)]
    keys += [(f"trainer.linear.{k}", a) for k, a in stage_hints.items() if a is not Any]
    probed = 0
    for key, ann in keys:
        for value in violations(ann):
            literal = f"'{value}'" if isinstance(value, str) else str(value).lower()
            try:  # OmegaConf refuses some types itself, at composition
                cfg = compose_config([f"{key}={literal}"], tmp_path)
            except ConfigCompositionException as err:
                assert key in str(err.__cause__), (key, value, err)
                continue
            with pytest.raises(ConfigError) as found:
                validate(cfg)
            assert found.value.key == key, (key, value, found.value)
            probed += 1
    assert probed > 15


def test_optimizer_and_schedule_limits_are_refused_by_key(tmp_path: Path) -> None:
    for overrides, key in [
        (["trainer.linear.optimizer.momentum=5"], "trainer.linear.optimizer.momentum"),
        (
            ["trainer.finetune.optimizer.weight_decay=1e6"],
            "trainer.finetune.optimizer.weight_decay",
        ),
        (
            ["scheduler@trainer.linear.scheduler=step", "trainer.linear.scheduler.gamma=10"],
            "trainer.linear.scheduler.gamma",
        ),
    ]:
        with pytest.raises(ConfigError) as err:
            validate(compose_config(overrides, tmp_path))
        assert err.value.key == key
    torch.optim.SGD(
        [torch.zeros(1, requires_grad=True)], lr=1, momentum=5
    )  # torch alone accepts it
