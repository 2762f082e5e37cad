"""Seeded config fuzz: every random override set ends in a working model or in one message.

Each set picks group options and a few keys, each with a value drawn from its valid or
its invalid values (an oracle below knows which, including the few rules that involve
two keys). Group options come from a pool of combinations composed once each by Hydra
(a composition costs ~0.1-0.3 s); the keys are then applied by Hydra's own override
parser and merger, exactly as ``compose`` applies them.

A set with an invalid value must fail at composition or in ``validate`` (or, for a batch
larger than the split, in ``check_batch_sizes``) with an error naming one of its invalid
keys; a valid set must pass, build its model and dataset and run a forward pass.
Anything else fails the test: a raw exception (TypeError, ZeroDivisionError...) or an
invalid value that is accepted.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig

from bcnn.config import instantiate, validate
from bcnn.engine.trainer import check_batch_sizes
from bcnn.models import build_model
from tests.conftest import run_train

SETS = 320
POOL = 24  # distinct group combinations, each composed once
INVALID_SHARE = 0.15
BASE = [
    "dataset.trainval_size=40",
    "dataset.test_size=8",
    "trainer.linear.batch_size=8",
    "trainer.finetune.batch_size=8",
]
TRAIN_SPLIT = 32  # 40 images, val_fraction 0.2 (40 with val_fraction 0)

Groups = dict[str, str]
MATRIX_STEPS = {"sqrt_l2": "sqrt", "sqrt_signsqrt_l2": "sqrt", "log_l2": "log"}
HAS_SIGNSQRT = {"signsqrt_l2", "sqrt_signsqrt_l2", "log_signsqrt_l2"}


@dataclass(frozen=True)
class Key:
    """A config key with values on both sides of its range.

    ``when`` restricts the key to group choices where it exists; ``+`` marks keys added
    to a node that does not have them.
    """

    key: str
    valid: tuple
    invalid: tuple
    when: Callable[[Groups], bool] = lambda g: True


def _fmt(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def _step(groups: Groups) -> str | None:
    return MATRIX_STEPS.get(groups["normalization"])


KEYS = [
    Key("backbone.channels", ([8], [4, 8]), (8, [0], [-3], "abc", [1.5], [])),
    Key("backbone.batch_norm", (True, False), ("maybe", 2, 1.5)),
    Key("+backbone.foo", (), (1,)),
    Key("pooling.proj_dim", (None, 4), (0, -4, 1.5, "abc", 10**9)),
    Key("pooling.proj_bn", (True, False), ("yes!", "maybe")),
    Key("pooling.proj_lr_scale", (0, 0.5, 2), (-1, "nan", "inf", "abc")),
    Key("+pooling.foo", (), (1, "x")),
    Key("pooling.gamma", (0, 0.5, 1), (-3, 1.5, "nan"), lambda g: g["pooling"] == "democratic"),
    Key("pooling.tau", (0.5, 1), (0, -1, 5, "inf"), lambda g: g["pooling"] == "democratic"),
    Key("pooling.iters", (1, 3), (0, -2, 2.5), lambda g: g["pooling"] == "democratic"),
    Key("pooling.detach", (True,), ("sometimes",), lambda g: g["pooling"] == "democratic"),
    Key("pooling.sketch.out_dim", (64, 128), (0, -1, 1.5), lambda g: g["pooling"] == "compact"),
    Key("pooling.sketch.seed", (0, 3), (-1, 2**40), lambda g: g["pooling"] == "compact"),
    Key("normalization.mpow.p", (0.5, 0.3), (0, 1.5, -1), lambda g: g["pooling"] == "spectral"),
    Key("normalization.mpow.eps", (0, 1e-3), (-1, "nan"), lambda g: g["pooling"] == "spectral"),
    Key("+normalization.foo", (), ("abc", 1)),
    Key(
        "normalization.signsqrt.eps",
        (1e-8,),
        (0, -1, "inf"),
        lambda g: g["normalization"] in HAS_SIGNSQRT,
    ),
    Key("normalization.signsqrt", (None,), (), lambda g: g["normalization"] in HAS_SIGNSQRT),
    Key("classifier.bias", (True, False), ("maybe",)),
    Key("classifier.rank", (1, 4), (0, -2, 1.5), lambda g: g["classifier"] == "lowrank"),
    Key("+classifier.foo", (), (1,)),
    Key("dataset.num_classes", (2, 5, 12), (0, -3, 1.5, "abc", 1000)),
    Key("dataset.num_textons", (3, 4), (1, 0, 20)),
    Key("dataset.image_size", (16, 32, 48), (-32, 0, 30, 1.5)),
    Key("dataset.cell_size", (4, 8, 16), (0, -8)),
    Key("dataset.val_fraction", (0, 0.2), (1, -0.1, "nan")),
    Key("dataset.cell_noise", (0, 0.3), (-0.1, 2)),
    Key("+dataset.foo", (), (1,)),
    Key("dataset.name", ("synthetic", "my_set"), (3, "' '")),
    Key("trainer.linear.lr", (0.1, 10), (0, -1, "inf", "nan")),
    Key("trainer.finetune.lr", (0.1,), (0, -1, "inf")),
    Key("trainer.linear.batch_size", (8, 16), (0, -1, 100, 99999999999)),
    Key("trainer.finetune.backbone_lr", (0.01, 0), (-1, "nan")),
    Key("trainer.linear.epochs", (1, 3), (0, -1, 1.5)),
    Key("trainer.linear.grad_clip", (None, 1.0), (0, -1, "nan")),
    Key("trainer.linear.grad_accum", (1, 2), (0, -2)),
    Key("trainer.linear.optimizer.momentum", (0, 0.9), (-0.5, "nan")),
    Key("trainer.finetune.optimizer.weight_decay", (0, 1e-4), (-1, "inf")),
    Key("+trainer.linear.optimizer.lr", (), (0.5,)),
    Key("+trainer.linear.optimizer.nesterovv", (), (True,)),
    Key("trainer.device", ("cpu", "auto"), ("cuda:7", "cpu:abc", "tpu", "cpu:1")),
    Key("trainer.precision", ("32", "bf16"), ("fp8", 16)),
    Key("trainer.num_workers", (0,), (-1,)),
    Key("trainer.limit_train_batches", (None, 2), (0, -1)),
    Key("trainer.eval_batch_size", (None, 4), (0,)),
    Key("trainer.cache_features", ("auto", True, False), ("maybe",)),
    Key("trainer.cache_dtype", ("float16",), ("float64", "int8")),
    Key(
        "trainer.stages",
        (["linear"], ["linear", "finetune"], ["finetune"]),
        (["pretrain"], [], ["linear", "linear"]),
    ),
    Key("+trainer.foo", (), (1,)),
    Key("+paths.foo", (), (1,)),
    Key("+foo", (), (1,)),
    Key("seed", (0, 7), (-1, 99999999999999999999, 1.5)),
]
GROUPS = {
    "pooling": ("sum", "avg", "democratic", "compact", "spectral"),
    "normalization": ("signsqrt_l2", "l2", "none", "sqrt_l2", "log_l2", "sqrt_signsqrt_l2"),
    "classifier": ("linear", "lowrank"),
    "scheduler@trainer.linear.scheduler": ("cosine", "step", "constant", "plateau"),
    "optimizer@trainer.finetune.optimizer": ("sgd", "adam", "adamw"),
}


@dataclass
class Case:
    groups: tuple[str, ...]  # group overrides
    overrides: list[str]  # key overrides
    invalid: list[str]  # keys with a value outside their range
    values: dict[str, object]


def _interactions(groups: Groups, values: dict[str, object]) -> list[str]:
    """Keys made invalid by another key's value (rules over two keys)."""
    bad = []
    classes = values.get("dataset.num_classes", 12)
    textons = values.get("dataset.num_textons", 4)
    ints = isinstance(classes, int) and isinstance(textons, int)
    if ints and textons >= 2 and classes > math.factorial(textons):
        bad.append("dataset.num_classes")
    size, cell = values.get("dataset.image_size", 32), values.get("dataset.cell_size", 8)
    if isinstance(size, int) and isinstance(cell, int) and size > 0 and cell > 0 and size % cell:
        bad.append("dataset.image_size")
    stages = values.get("trainer.stages", ["linear", "finetune"])
    if values.get("trainer.finetune.backbone_lr") == 0 and "finetune" in stages:
        bad.append("trainer.finetune.backbone_lr")
    batch = values.get("trainer.linear.batch_size")
    limited = values.get("trainer.limit_train_batches") is not None  # then only a warning
    if isinstance(batch, int) and batch > TRAIN_SPLIT and "linear" in stages and not limited:
        bad.append("trainer.linear.batch_size")  # known once the dataset is
    return bad


def group_pool(rng: random.Random) -> list[Groups]:
    """``POOL`` random combinations of group options."""
    return [{g: rng.choice(opts) for g, opts in GROUPS.items()} for _ in range(POOL)]


def make_case(rng: random.Random, pool: list[Groups]) -> Case:
    groups = rng.choice(pool)
    keys = [k for k in KEYS if k.when(groups)]
    chosen = rng.sample(keys, rng.randint(1, 3))
    names = [k.key.lstrip("+") for k in chosen]
    # A key and one inside it (normalization.signsqrt=null and normalization.signsqrt.eps)
    # cannot both be set.
    chosen = [k for k, n in zip(chosen, names) if not any(n.startswith(f"{m}.") for m in names)]
    overrides, invalid, values = [], [], {}
    for spec in chosen:
        use_invalid = spec.invalid and (not spec.valid or rng.random() < INVALID_SHARE)
        value = rng.choice(spec.invalid if use_invalid else spec.valid)
        name = spec.key.lstrip("+")
        overrides.append(f"{spec.key}={_fmt(value)}")
        values[name] = value
        too_big = name == "trainer.linear.batch_size" and isinstance(value, int) and value > 0
        if use_invalid and not too_big:
            invalid.append(name)
    group_overrides = tuple(f"{g}={o}" for g, o in groups.items())
    return Case(group_overrides, overrides, invalid + _interactions(groups, values), values)


def _names_one_of(message: str, keys: list[str]) -> bool:
    # bcnn quotes the key; Hydra's composition errors give the override or the full key.
    return any(
        f"'{k}'" in message or f"full_key: {k}" in message or f"{k}=" in message for k in keys
    )


def _device_valid(value: str) -> bool:
    """cuda:7 is valid on a machine with 8 GPUs (the oracle follows the machine)."""
    return value == "cuda:7" and torch.cuda.device_count() >= 8


def run_case(case: Case, composed: dict[tuple[str, ...], DictConfig]) -> str:
    """Composes, validates and builds one case; returns how it ended (for the summary)."""
    if "trainer.device" in case.invalid and _device_valid(str(case.values["trainer.device"])):
        case.invalid.remove("trainer.device")
    if case.groups not in composed:
        composed[case.groups] = compose("train", overrides=[*BASE, *case.groups])
    try:
        cfg = copy.deepcopy(composed[case.groups])
        overrides = OverridesParser.create().parse_overrides(case.overrides)
        ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)
        validate(cfg)
        train_split = instantiate(cfg.dataset, split="train", augment=True)
        check_batch_sizes(cfg.trainer, len(train_split))
    except (ConfigCompositionException, OverrideParseException, ValueError) as err:
        message = f"{err} {err.__cause__ or ''}"
        assert case.invalid, f"valid set {case} refused: {message}"
        assert _names_one_of(message, case.invalid), (case, message)
        if isinstance(err, ValueError):
            assert type(err).__name__ == "ConfigError", (case, repr(err))
        return "refused"
    assert not case.invalid, f"{case}: accepted although {case.invalid} are invalid"
    try:
        model = build_model(cfg, len(train_split.classes))
    except ValueError as err:
        # Only combinations of valid options may fail here (a matrix step after a vector
        # pooling, a low-rank classifier on vectors), naming the group.
        assert any(g in str(err) for g in ("normalization", "classifier", "pooling")), str(err)
        return "incompatible"
    images = torch.stack([train_split[i][0] for i in range(2)])
    with torch.no_grad():
        logits = model.eval()(images)
    assert logits.shape == (2, len(train_split.classes))
    return "built"


def test_random_override_sets_end_in_a_model_or_one_message() -> None:
    rng = random.Random(1234)
    pool = group_pool(rng)
    composed: dict[tuple[str, ...], DictConfig] = {}
    outcomes: dict[str, int] = {}
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        for _ in range(SETS):
            end = run_case(make_case(rng, pool), composed)
            outcomes[end] = outcomes.get(end, 0) + 1
    # The draw covers both sides: many refusals, many working models.
    assert outcomes.get("refused", 0) > SETS // 4 and outcomes.get("built", 0) > SETS // 6, outcomes


REAL_RUNS = [
    # (overrides, the key the error names, or None for a clean run)
    (["pooling=democratic", "pooling.tau=0"], "pooling.tau"),
    (
        ["trainer.linear.batch_size=99999999999", "trainer.limit_train_batches=null"],
        "trainer.linear.batch_size",
    ),
    (["pooling=compact", "pooling.sketch.out_dim=256", "trainer.linear.grad_clip=1.0"], None),
]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "key"), REAL_RUNS, ids=lambda x: str(x))
def test_real_runs_end_cleanly_or_name_the_key(
    overrides: list[str], key: str | None, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    smoke = ["debug=smoke", "dataset.trainval_size=100", "dataset.test_size=40"]
    proc = run_train([*smoke, *overrides, f"hydra.run.dir={run_dir}"])
    if key is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (run_dir / "results.json").is_file()
        return
    assert proc.returncode != 0
    assert key in proc.stderr, proc.stderr[-2000:]
    # A refused run leaves nothing that would block the directory or look like a result.
    assert not any((run_dir / n).exists() for n in ("config.yaml", "metrics.csv", "results.json"))
