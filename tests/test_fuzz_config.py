"""Seeded config fuzz: every random override set ends in a working model or in one message.

What is valid comes from the declarations (``bcnn.limits``), not from a table here: for a
combination of group options, every parameter of every ``_target_`` node (nested steps,
sketches and streams too) and every field of the trainer, paths and root schema is a key;
its valid values come from ``valid_values`` and its invalid ones from ``violations``
(tests/declarations.py: bounds, options, booleans as strings, unusable paths). Rules over
several keys are the declarations' too: a node's ``config_problem`` on the values it ends
up with, a key its target does not take (one a recipe set for another optimizer), and,
once the dataset is known, a batch larger than the training split.

Combinations come from a pool composed once each by Hydra (a composition costs 0.1-0.3 s);
the keys are then applied by Hydra's own override parser and merger, as ``compose`` does.

A set with an invalid value must fail at composition or in ``validate`` (or, for the batch
rule, in ``check_batch_sizes``) with an error naming one of its invalid keys; a valid set
must pass, build its model and dataset and run a finite forward pass. Anything else fails
the test: a raw exception (TypeError, ZeroDivisionError...) or an invalid value accepted.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import typing
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from bcnn.config import GROUP_ARGS, STAGE_ARGS, STAGES, TrainConfig, validate
from bcnn.engine.trainer import check_batch_sizes
from bcnn.errors import ConfigError, instantiate
from bcnn.limits import Fields, is_target_node, signature, writable_dir
from bcnn.models import build_model
from tests.conftest import run_train
from tests.declarations import valid_values, violations

SETS = 320
POOL = 24  # distinct group combinations, each composed once
INVALID_SHARE = 0.15  # of the keys drawn, when a key has values on both sides
REMOVE_SHARE = 0.05  # of the keys drawn, a `~key` (refused where the parameter is required)
UNKNOWN_SHARE = 0.15  # of the keys no node takes (always refused), those that may be drawn
FIX_SHARE = 0.7  # of the sets with keys a recipe left, those that remove them
UNKNOWN = "fuzz_key"  # a key no node takes
ABSENT = object()  # the value of a parameter the config does not set
BATCH = ["trainer.linear.batch_size=8", "trainer.finetune.batch_size=8"]
BATCH += ["trainer.linear.grad_accum=1", "trainer.finetune.grad_accum=1"]
SMALL_STREAMS = [
    "~backbone.stream_a",
    "~backbone.stream_b",
    "+backbone.stream_a={_target_:bcnn.models.backbones.SmallCNN,channels:[8]}",
    "+backbone.stream_b={_target_:bcnn.models.backbones.SmallCNN,channels:[4],batch_norm:true}",
]
# Group choices (None: the config's own). A recipe sets optimizer keys for the optimizer it
# chooses: switching the optimizer group leaves them to remove with `~key`.
GROUPS: dict[str, tuple[str | None, ...]] = {
    "backbone": ("small", "small", "small", "two_stream"),
    "pooling": ("sum", "sum", "democratic", "spectral", "avg", "democratic_avg", "compact"),
    "normalization": (
        "signsqrt_l2",
        "l2",
        "none",
        "sqrt_l2",
        "log_l2",
        "sqrt_signsqrt_l2",
        "log_signsqrt_l2",
    ),
    "classifier": ("linear", "linear", "lowrank"),
    "dataset": ("synthetic", "synthetic", "folder"),
    "recipe": (None, None, "bcnn_pytorch", "bcnn_matlab"),
    "optimizer@trainer.linear.optimizer": (None, "sgd", "adam", "adamw"),
    "optimizer@trainer.finetune.optimizer": (None, "sgd", "adam", "adamw"),
    "scheduler@trainer.linear.scheduler": (None, "cosine", "step", "constant", "plateau"),
    "scheduler@trainer.finetune.scheduler": (None, "cosine", "step", "constant", "plateau"),
}


# ---- the keys of a config and their declarations ---------------------------------------------
@dataclass(frozen=True)
class Slot:
    """A config key, its declaration and its composed value (ABSENT: not in the config)."""

    key: str
    ann: Any
    current: Any = ABSENT
    required: bool = False  # a parameter without a default
    unknown: bool = False  # not a parameter: every value is refused
    removable: bool = True  # a node's parameter (not a schema field)


def _schema_slots(schema: type, values: Mapping[str, Any], prefix: str) -> Iterator[Slot]:
    hints = typing.get_type_hints(schema, include_extras=True)
    for f in dataclasses.fields(schema):  # type: ignore[arg-type]
        ann, full = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(ann):
            yield from _schema_slots(ann, values[f.name], f"{full}.")  # type: ignore[arg-type]
        elif ann is not Any:
            yield Slot(full, ann, values.get(f.name, ABSENT), removable=False)
    yield Slot(f"{prefix}{UNKNOWN}", Any, unknown=True)


def _fields(ann: Any) -> type | None:
    """The dataclass of a ``Fields`` declaration in ``ann`` (a transform recipe), if any."""
    for arm in (ann, *typing.get_args(ann)):
        for meta in getattr(arm, "__metadata__", ()):
            if isinstance(meta, Fields):
                return meta.schema
    return None


def _node_slots(node: Any, key: str, provided: tuple[str, ...] = ()) -> Iterator[Slot]:
    """Every parameter of the node's target (and of nested nodes), minus those bcnn passes."""
    target = get_object(node["_target_"])
    sig = signature(target)
    for name, param in sig.params.items():
        value, full = node.get(name, ABSENT), f"{key}.{name}"
        if name in provided:
            yield Slot(full, Any, value, unknown=True)  # bcnn sets it: refused
        elif is_target_node(value):
            yield from _node_slots(value, full, getattr(target, "passes", {}).get(name, ()))
        elif isinstance(value, Mapping) and _fields(param.annotation):
            yield from _schema_slots(_fields(param.annotation), value, f"{full}.")
        else:
            yield Slot(full, param.annotation, value, param.required)
    for name, value in node.items():  # through **kwargs: built with what the target is given
        if name not in sig.params and is_target_node(value):
            yield from _node_slots(value, f"{key}.{name}", provided)
    if not sig.takes_var_keyword:
        yield Slot(f"{key}.{UNKNOWN}", Any, unknown=True)


def config_slots(cfg: DictConfig) -> list[Slot]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    found = list(_schema_slots(TrainConfig, plain, ""))
    for group, provided in GROUP_ARGS.items():
        found += _node_slots(plain[group], group, provided)
    for stage in STAGES:
        for kind, provided in STAGE_ARGS.items():
            found += _node_slots(plain["trainer"][stage][kind], f"trainer.{stage}.{kind}", provided)
    return found


def _nodes(value: Any, key: str) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(key, target, values) of every node with a ``_target_`` or a ``Fields`` schema."""
    if not isinstance(value, Mapping):
        return
    if is_target_node(value):
        target = get_object(value["_target_"])
        values = {k: v for k, v in value.items() if not k.startswith("_")}
        yield key, target, values
        params = signature(target).params
        for name, sub in values.items():
            schema = _fields(params[name].annotation) if name in params else None
            if schema is not None and isinstance(sub, Mapping):
                yield f"{key}.{name}", schema, dict(sub)
    for name, sub in value.items():
        yield from _nodes(sub, f"{key}.{name}" if key else str(name))


def stale_keys(cfg: DictConfig) -> list[str]:
    """Keys a node's target does not take: left by a recipe for the optimizer it chose."""
    found = []
    for key, target, values in _nodes(OmegaConf.to_container(cfg, resolve=False), ""):
        sig = signature(target) if not dataclasses.is_dataclass(target) else None
        if sig is not None and not sig.takes_var_keyword:
            found += [f"{key}.{name}" for name in values if name not in sig.params]
    return found


def _holds(values: Mapping[str, Any], key: str) -> bool:
    """Whether the relative ``key`` is one of ``values``' own (not of a nested node)."""
    head, _, rest = key.partition(".")
    sub = values.get(head)
    return not rest or (isinstance(sub, Mapping) and not is_target_node(sub) and _holds(sub, rest))


def _schemas(schema: type, values: Mapping[str, Any], key: str) -> Iterator[tuple]:
    """(key, schema, values) of the root schema and of the schemas in its fields."""
    yield key, schema, values
    for name, ann in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(ann):
            yield from _schemas(ann, values[name], f"{key}.{name}" if key else name)  # type: ignore[arg-type]


def node_rules(cfg: DictConfig, skip: set[str]) -> set[str]:
    """Keys a node's (or schema's) ``config_problem`` refuses, on the values it ends up with
    (those holding a key of ``skip``, already invalid on its own, are not asked)."""
    found = set()
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key, target, values in [*_schemas(TrainConfig, plain, ""), *_nodes(plain, "")]:
        rule = getattr(target, "config_problem", None)
        inside = [k[len(key) + 1 :] for k in skip if k.startswith(f"{key}.")]
        if rule is None or any(_holds(values, k) for k in inside):
            continue
        given = {n: p.default for n, p in signature(target).params.items() if not p.required}
        problem = rule({**given, **values})
        if problem:
            found.add(f"{key}.{problem[0]}" if key else problem[0])
    return found


# ---- one random set ---------------------------------------------------------------------------
@dataclass
class Pool:
    """A combination of group options, composed, with its keys."""

    groups: list[str]
    cfg: DictConfig
    slots: list[Slot]
    stale: list[str]  # keys a recipe set that the chosen target does not take


@dataclass
class Case:
    combo: int  # index into the pool
    overrides: list[str] = field(default_factory=list)
    invalid: set[str] = field(default_factory=set)  # keys with a value outside their limits
    kinds: dict[str, str] = field(default_factory=dict)  # invalid key -> its kind of value


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return f"'{value}'"
    return str(value)


def _checks(ann: Any) -> set[Any]:
    """The functions of the Checks declared in ``ann`` (and its arms)."""
    found = {m.fn for m in getattr(ann, "__metadata__", ()) if hasattr(m, "fn")}
    return found.union(*(_checks(a) for a in typing.get_args(ann)))


def _kind(slot: Slot, value: Any) -> str:
    """The kind of an invalid value, for the summary (issue 20 names four)."""
    if writable_dir in _checks(slot.ann):
        return "path"
    if value == "yes":
        return "boolean string"
    if ".optimizer." in slot.key or ".scheduler." in slot.key:
        return "optimizer/scheduler argument"
    return "value"


def _set(case: Case, slot: Slot, value: Any, invalid: bool) -> None:
    plus = "+" if slot.current is ABSENT else ""
    case.overrides.append(f"{plus}{slot.key}={_fmt(value)}")
    if invalid:
        case.invalid.add(slot.key)
        case.kinds[slot.key] = _kind(slot, value)


def _draw(case: Case, slot: Slot, rng: random.Random, examples: dict) -> None:
    """A value for ``slot``, on one side of its limits or the other, or its removal."""
    valid = valid_values(slot.ann, examples) if not slot.unknown else []
    if slot.current is not ABSENT and not slot.unknown:
        valid = [slot.current, *valid]
    invalid = [1] if slot.unknown else list(violations(slot.ann, files=True))
    # (Hydra cannot delete a key that holds null.)
    removable = slot.removable and slot.current not in (ABSENT, None) and not slot.unknown
    if removable and rng.random() < REMOVE_SHARE:
        case.overrides.append(f"~{slot.key}")
        if slot.required:
            case.invalid.add(slot.key)
        return
    use_invalid = bool(invalid) and (not valid or rng.random() < INVALID_SHARE)
    if use_invalid or valid:
        _set(case, slot, rng.choice(invalid if use_invalid else valid), use_invalid)


def make_case(rng: random.Random, pool: list[Pool], examples: dict, kind: str = "") -> Case:
    """One random set of 1 to 3 keys; with ``kind``, one that holds an invalid value of that
    kind (so that every kind is drawn, whatever the seed)."""
    with_stale = [i for i, p in enumerate(pool) if p.stale]
    case = Case(rng.choice(with_stale) if kind == "recipe-set key" else rng.randrange(len(pool)))
    combo = pool[case.combo]
    slots = [s for s in combo.slots if not s.unknown or rng.random() < UNKNOWN_SHARE]
    chosen = rng.sample(slots, rng.randint(1, 3))
    if kind in ("path", "boolean string", "optimizer/scheduler argument"):
        bad = [(s, v) for s in combo.slots for v in violations(s.ann, True) if _kind(s, v) == kind]
        slot, value = rng.choice(bad)
        chosen = [s for s in chosen if s.key != slot.key]
        _set(case, slot, value, invalid=True)
    for slot in chosen:
        _draw(case, slot, rng, examples)
    if combo.stale and kind != "recipe-set key" and rng.random() < FIX_SHARE:
        case.overrides += [f"~{k}" for k in combo.stale]  # the fix the message suggests
    elif combo.stale:
        case.invalid.update(combo.stale)
        case.kinds.update(dict.fromkeys(combo.stale, "recipe-set key"))
    return case


# ---- running a set ----------------------------------------------------------------------------
def _named(err: Exception, keys: set[str]) -> str | None:
    """The key of ``keys`` that an error names (a field of a mapping: the mapping's key, and
    the field in the message), if any."""
    if isinstance(err, ConfigError):
        if err.key in keys:
            return err.key
        inside = (k for k in keys if k.startswith(f"{err.key}."))
        return next((k for k in inside if k[len(err.key) + 1 :] in err.problem), None)
    message = f"{err} {err.__cause__ or ''}"
    # Hydra's composition errors give the override or the full key.
    named = (k for k in keys if f"'{k}'" in message or f"full_key: {k}" in message)
    return next(named, None) or next((k for k in keys if f"{k}=" in message), None)


def _refused(case: Case, err: Exception, invalid: set[str], stale: list[str]) -> str:
    assert invalid, f"valid set {case} refused: {err}"
    key = _named(err, invalid)
    assert key, (case, invalid, str(err))
    if isinstance(err, ValueError):
        assert isinstance(err, ConfigError), (case, repr(err))
        if err.key in stale:  # the recipe's key: the message says how to drop it
            assert f"'~{err.key}'" in err.problem, str(err)
    return case.kinds.get(key, "value")


def run_case(case: Case, pool: list[Pool]) -> str:
    """Composes, validates and builds one case; returns how it ended (for the summary): the
    kind of value a refusal named, or how a valid set ended."""
    combo = pool[case.combo]
    cfg = copy.deepcopy(combo.cfg)
    try:
        overrides = OverridesParser.create().parse_overrides(case.overrides)
        ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)
    except (ConfigCompositionException, OverrideParseException, ValueError) as err:
        return _refused(case, err, case.invalid, combo.stale)
    invalid = case.invalid | node_rules(cfg, case.invalid)
    try:
        validate(cfg, files=True)
    except (ConfigCompositionException, ValueError) as err:
        return _refused(case, err, invalid, combo.stale)
    assert not invalid, f"{case}: accepted although {invalid} are invalid"
    try:
        train_split = instantiate(cfg.dataset, split="train", augment=True)
    except FileNotFoundError as err:
        # A root with no data is found where the data is read (before the model), by design.
        assert any("dataset.root" in o for o in case.overrides), (case, str(err))
        assert "dataset.root" in str(err), str(err)
        return "no data"
    # Known once the dataset is: a batch larger than the training split.
    too_big = {
        f"trainer.{s}.batch_size"
        for s in cfg.trainer.stages
        if cfg.trainer[s].batch_size > len(train_split)
    }
    try:
        check_batch_sizes(cfg.trainer, len(train_split))
    except ConfigError as err:
        assert too_big and cfg.trainer.limit_train_batches is None, (case, str(err))
        return _refused(case, err, too_big, [])
    assert not too_big or cfg.trainer.limit_train_batches is not None, (case, too_big)
    # ---- Shapes and memory (issue 20, items 5 and 8): the plan's place -------------------
    # In-range values too large for the machine (pooling.proj_dim=65536,
    # dataset.image_size=4096, dataset.trainval_size=10**7, pooling.sketch.out_dim=2**24,
    # dataset.transform.size=8192), inputs too small for a backbone's depth and parts that
    # cannot follow each other (a matrix step after a vector pooling) are the shape/memory
    # plan's to refuse before any work (another change). Until it is called here, the
    # declarations' large sizes are not drawn (tests/declarations.py, SMALL_BOUND), the
    # backbones keep any input size, and an incompatible combination ends below, naming
    # its group.
    try:
        model = build_model(cfg, len(train_split.classes))
    except ValueError as err:
        assert any(g in str(err) for g in ("normalization", "classifier", "pooling")), str(err)
        return "incompatible"
    images = torch.stack([train_split[i][0] for i in range(min(2, len(train_split)))])
    with torch.no_grad():
        model.eval()
        if getattr(model.pooling, "needs_fit", False):  # as the trainer does, before training
            model.pooling.fit([model.backbone(model.normalize_input(images))])
        logits = model(images)
    assert logits.shape == (len(images), len(train_split.classes)), case
    assert torch.isfinite(logits).all(), (case, logits)
    return "built"


def _folder(root: Path) -> Path:
    """A tiny image folder: 3 classes of 8 images, 20 x 20 px."""
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def group_pool(rng: random.Random, tmp: Path) -> list[Pool]:
    """``POOL`` random combinations of group options, each composed once."""
    own = {
        "synthetic": ["dataset.trainval_size=40", "dataset.test_size=8"],
        "folder": [f"dataset.root={_folder(tmp / 'images')}", "dataset.transform.size=16"],
    }
    pool = []
    for i in range(POOL):
        choice = {g: rng.choice(options) for g, options in GROUPS.items()}
        if i == 0:  # issue 20's: the recipe of dataset=folder set the momentum of its SGD
            choice |= {"dataset": "folder", "optimizer@trainer.linear.optimizer": "adam"}
        groups = [f"{g}={o}" for g, o in choice.items() if o not in (None, "two_stream")]
        if choice["backbone"] == "two_stream":
            groups += ["backbone=vgg_dm", *SMALL_STREAMS]
        if choice["classifier"] == "lowrank":  # it reads the matrix
            groups += ["normalization.vectorize=null"]
        cfg = compose("train", overrides=[*groups, *BATCH, *own[choice["dataset"]]])
        pool.append(Pool(groups, cfg, config_slots(cfg), stale_keys(cfg)))
    return pool


def test_random_override_sets_end_in_a_model_or_one_message(tmp_path: Path) -> None:
    rng = random.Random(1234)
    examples = {writable_dir: (str(tmp_path / "out"),)}
    # Issue 20's kinds of value, each drawn twice whatever the seed; then any set.
    kinds = ["path", "boolean string", "optimizer/scheduler argument", "recipe-set key"] * 2
    ends: Counter[str] = Counter()
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        pool = group_pool(rng, tmp_path)
        for i in range(SETS):
            case = make_case(rng, pool, examples, kinds[i] if i < len(kinds) else "")
            ends[run_case(case, pool)] += 1
    # The draw covers both sides, and every kind is refused by key.
    refused = sum(n for end, n in ends.items() if end in {"value", *kinds})
    assert refused > SETS // 4 and ends["built"] > SETS // 6, ends
    assert set(kinds) <= set(ends), ends


# Issue 20's value kinds, each on its own (applied to one composed config).
KINDS = [
    (["trainer.cache_dir=/dev/null"], "trainer.cache_dir"),
    (["trainer.cache_dir=/proc/nonexistent/x"], "trainer.cache_dir"),
    (["paths.output_dir=/dev/null/x"], "paths.output_dir"),
    (["trainer.test_flip='yes'"], "trainer.test_flip"),
    (["trainer.progress='no'"], "trainer.progress"),
    (["pooling.proj_bn='yes'"], "pooling.proj_bn"),
    (["trainer.linear.optimizer.momentum=5"], "trainer.linear.optimizer.momentum"),
    (["trainer.finetune.optimizer.weight_decay=1e6"], "trainer.finetune.optimizer.weight_decay"),
    (["dataset.pixel_noise=1e9"], "dataset.pixel_noise"),
    (["~logger._target_"], "logger"),  # a mapping of loggers the trainer cannot build
    (  # torch's rule, declared: raised by torch.optim.SGD before, naming only the node
        ["+trainer.linear.optimizer.nesterov=true", "trainer.linear.optimizer.momentum=0"],
        "trainer.linear.optimizer.nesterov",
    ),
]
# What the fuzz found accepted by validate and failing later, each with the groups it needs.
FOUND = [
    (["pooling=compact", "+pooling.sketch.in_dim=3"], "pooling.sketch.in_dim"),  # TypeError
    (  # the recipe's with_groups(SGD) took Adam's betas: TypeError naming the node only
        ["recipe=bcnn_matlab", "optimizer@trainer.finetune.optimizer=adam"],
        "trainer.finetune.optimizer.betas",
    ),
]


def test_issue_20_value_kinds_are_refused_by_key(tmp_path: Path) -> None:
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        base = compose("train")
        folder = [f"dataset.root={_folder(tmp_path / 'images')}", "dataset=folder"]
        switched = compose("train", overrides=[*folder, "optimizer@trainer.linear.optimizer=adam"])
        found = [(compose("train", overrides=o), key) for o, key in FOUND]
        # A folder of images has no boxes: a ValueError when the dataset was built.
        found += [
            (compose("train", overrides=[*folder, "+dataset.bbox_crop=true"]), "dataset.bbox_crop")
        ]
    for cfg, key in found:
        with pytest.raises(ConfigError) as err:
            validate(cfg)
        assert err.value.key == key, str(err.value)
    for overrides, key in KINDS:
        cfg = copy.deepcopy(base)
        ConfigLoaderImpl._apply_overrides_to_config(
            OverridesParser.create().parse_overrides(overrides), cfg
        )
        with pytest.raises(ConfigError) as err:
            validate(cfg, files=True)
        assert err.value.key == key, (overrides, str(err.value))
    # dataset=folder's recipe (bcnn_pytorch) set the momentum of the SGD it chose.
    key = "trainer.linear.optimizer.momentum"
    assert stale_keys(switched) == [key]
    with pytest.raises(ConfigError) as err:
        validate(switched)
    assert err.value.key == key and f"'~{key}'" in str(err.value)
    del switched.trainer.linear.optimizer.momentum  # what `~key` does
    validate(switched)


REAL_RUNS = [
    # (overrides, the key the error names, or None for a clean run)
    (["pooling=democratic", "pooling.tau=0"], "pooling.tau"),
    (
        ["trainer.linear.batch_size=99999999999", "trainer.limit_train_batches=null"],
        "trainer.linear.batch_size",
    ),
    (["trainer.test_flip=yes"], "trainer.test_flip"),
    (["pooling=compact", "pooling.sketch.out_dim=256", "trainer.linear.grad_clip=1.0"], None),
]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "key"), REAL_RUNS, ids=lambda x: str(x))
def test_real_runs_end_cleanly_or_name_the_key(
    overrides: list[str], key: str | None, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    smoke = ["debug=smoke", "dataset.trainval_size=100", "dataset.test_size=40"]
    # As users see it: without HYDRA_FULL_ERROR, one message and no traceback.
    proc = run_train([*smoke, *overrides, f"hydra.run.dir={run_dir}"], full_error=False)
    if key is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (run_dir / "results.json").is_file()
        return
    assert proc.returncode != 0
    assert f"'{key}'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    # A refused run leaves nothing that would block the directory or look like a result.
    assert not any((run_dir / n).exists() for n in ("config.yaml", "metrics.csv", "results.json"))
