"""The training protocol of every experiment preset, and where each value comes from.

``bcnn/resources/protocols.csv`` is the machine-readable protocol table: one line per
(preset, field) with the value the preset composes to, the source the value comes from
(a paper's table or a file of the authors' code) and, where bcnn does not do what the
source did, the deviation. ``docs/protocols.md`` is the same table for reading
(:func:`protocol_markdown`). :func:`protocol_of` reads the fields off a composed config,
so the test suite checks every preset against the table and the docs against the CSV::

    python -m bcnn.reproduce.protocols            # presets that differ from the table
    python -m bcnn.reproduce.protocols --markdown # the docs page, from the CSV

Fields (``<stage>`` is ``linear`` or ``finetune``, present when the preset runs it and
trains it by gradient descent: the SVMs of ``classifier=svm`` are fitted on the cached
descriptors instead, and their settings are the ``classifier`` field's):

========================  ================================================================
``dataset``               the dataset the preset composes with (its default)
``model``                 backbone, pooling (with its projection), normalization steps
``recipe``                the ``recipe`` group option (configs/recipe/)
``input``                 resize and crop of the images (``transform`` recipe)
``train_augment``         random crop and/or horizontal flip at training time
``test_view``             the centre view, or the centre view averaged with its flip
``training_split``        ``trainval``, or ``train`` with a held-out validation fraction
``epoch_selection``       ``last`` epoch, or ``best validation`` epoch
``stages``                the stages run
``<stage>.optimizer``     the torch optimizer
``<stage>.lr``            learning rate of the head (classifier)
``<stage>.backbone_lr``   learning rate of the backbone (fine-tuning)
``<stage>.proj_lr``       learning rate of the 1x1 projection (when there is one)
``<stage>.momentum``      SGD momentum
``<stage>.betas``         Adam betas
``<stage>.eps``           Adam eps
``<stage>.weight_decay``  weight decay (``coupled`` L2 for SGD/Adam, ``decoupled`` AdamW)
``<stage>.group_decay``   per-group weight decay that differs from the optimizer's
``<stage>.epochs``        epochs
``<stage>.batch``         images per optimizer step (micro-batch x accumulation)
``<stage>.schedule``      learning-rate schedule
``classifier``            the classifier (an SVM: its cost, loss and calibration)
``matrix.function``       the matrix step (sqrt, log, power p) and its ridge
``matrix.train``          its method (and iterations) and backward where a gradient flows
``matrix.test``           its method (and iterations) for frozen features and evaluation
``signsqrt.eps``          the guard of the signed square root
========================  ================================================================
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from bcnn.ops import resolve_sqrtm

PROTOCOLS = "protocols.csv"
COLUMNS = ("preset", "dataset", "field", "value", "source", "deviation")
STAGE_FIELDS = (
    "optimizer",
    "lr",
    "backbone_lr",
    "proj_lr",
    "momentum",
    "betas",
    "eps",
    "weight_decay",
    "group_decay",
    "epochs",
    "batch",
    "schedule",
)
FIELDS = (
    "dataset",
    "model",
    "recipe",
    "input",
    "train_augment",
    "test_view",
    "training_split",
    "epoch_selection",
    "stages",
    *(f"linear.{f}" for f in STAGE_FIELDS),
    *(f"finetune.{f}" for f in STAGE_FIELDS),
    "classifier",
    "matrix.function",
    "matrix.train",
    "matrix.test",
    "signsqrt.eps",
)
MATRIX_STEPS = ("MatrixSqrt", "MatrixLog", "MatrixPower")


def _name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1]


def _num(value: Any) -> str:
    """A number as the table writes it: ``1e-05``, ``0.9``, ``16``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _optimizer(stage: DictConfig) -> tuple[str, dict[str, Any]]:
    """The torch optimizer class name and the per-group settings of a stage."""
    node = stage.optimizer
    groups: dict[str, Any] = {}
    name = _name(node._target_)
    if name == "with_groups":
        name = _name(node.optimizer)
        groups = {k: dict(v) for k, v in (node.get("groups") or {}).items()}
    return name, groups


def _schedule(stage: DictConfig) -> str:
    node = stage.scheduler
    name = _name(node._target_)
    if name == "ConstantLR":
        return "constant" if float(node.get("factor", 1.0)) == 1.0 else f"constant x{node.factor}"
    if name == "StepLR":
        return f"x{_num(float(node.gamma))} every {node.step_size} epochs"
    if name == "ReduceLROnPlateau":
        return (
            f"x{_num(float(node.factor))} after {node.patience} epochs without a better "
            f"validation accuracy (ReduceLROnPlateau, mode {node.mode})"
        )
    if name == "CosineAnnealingLR":
        return "cosine to 0"
    return name


def _stage_fields(cfg: DictConfig, name: str) -> dict[str, str]:
    stage = cfg.trainer[name]
    opt, groups = _optimizer(stage)
    node = stage.optimizer
    reset = ", state reset every epoch" if stage.get("reset_optimizer_each_epoch") else ""
    out = {"optimizer": opt + reset, "lr": _num(float(stage.lr))}
    if name == "finetune":
        out["backbone_lr"] = _num(float(stage.backbone_lr))
    if cfg.pooling.get("proj_dim"):
        proj = groups.get("proj", {})
        lr = proj.get("lr", float(stage.lr) * float(cfg.pooling.get("proj_lr_scale", 1.0)))
        out["proj_lr"] = _num(float(lr))
    if opt == "SGD":
        out["momentum"] = _num(float(node.get("momentum", 0.0)))
    if opt in ("Adam", "AdamW"):
        out["betas"] = ", ".join(_num(float(b)) for b in node.get("betas", (0.9, 0.999)))
        out["eps"] = _num(float(node.get("eps", 1e-8)))
    kind = "decoupled" if opt == "AdamW" else "coupled"
    out["weight_decay"] = f"{_num(float(node.get('weight_decay', 0.0)))} ({kind})"
    decays = [
        f"{g}: {_num(float(s['weight_decay']))}"
        for g, s in sorted(groups.items())
        if "weight_decay" in s
    ]
    if decays:
        out["group_decay"] = ", ".join(decays)
    out["epochs"] = str(stage.epochs)
    out["batch"] = str(int(stage.batch_size) * int(stage.grad_accum))
    out["schedule"] = _schedule(stage)
    return {f"{name}.{k}": v for k, v in out.items()}


def _input(transform: DictConfig | None) -> tuple[str, str]:
    """(``input``, ``train_augment``) of a dataset's transform recipe."""
    if not transform:
        return "generated at its own size", "none"
    recipe = transform.get("recipe", "short_side")
    size = int(transform.get("size", 448))
    flip = bool(transform.get("hflip", True))
    if recipe == "square":
        text, crop = f"resize to {size}x{size}", False
    elif recipe == "resize_crop":
        resize = int(transform.get("resize") or round(size * 8 / 7))
        text, crop = f"resize to {resize}x{resize}, crop {size}x{size}", True
    else:
        text, crop = f"short side {size}, crop {size}x{size}", True
    augment = " + ".join(p for p, on in (("random crop", crop), ("flip", flip)) if on)
    return text, augment or "none"


def _augment(cfg: DictConfig, live: str) -> str:
    """What the training images look like, per stage: the linear stage of a model whose
    only trainable layer is the classifier reads cached descriptors of the centre view (and
    of its mirror image when the recipe flips), the other stages the augmented images."""
    transform = cfg.dataset.get("transform")
    cached = str(
        cfg.trainer.get("cache_features", "auto")
    ).lower() != "false" and not cfg.pooling.get("proj_dim")
    parts = []
    for stage in cfg.trainer.stages:
        if stage == "linear" and cached and transform:
            flip = " and its mirror image" if transform.get("hflip", True) else ""
            view = "centre crop" if "crop" in _input(transform)[0] else "whole image"
            parts.append(f"{stage}: cached {view}{flip}")
        else:
            parts.append(f"{stage}: {live}")
    return "; ".join(parts)


def _pooling(node: DictConfig) -> str:
    name = _name(node._target_)
    if name in ("DemocraticPool", "DemocraticAvgPool"):
        name += f" (gamma {_num(float(node.gamma))})"
    elif name == "CompactPool":
        sketch = node.sketch
        name += f" ({_name(sketch._target_)} {sketch.out_dim}"
        if "gamma" in sketch:
            name += f", gamma {_num(float(sketch.gamma))}"
        name += ")"
    elif name == "FisherPool":
        name += (
            f" ({node.num_components} components, {node.num_samples} samples, at most "
            f"{node.samples_per_image} per image)"
        )
    if node.get("proj_dim"):
        name = f"1x1 conv to {node.proj_dim}, {name}"
    return name


def _model(cfg: DictConfig) -> str:
    backbone = _name(cfg.backbone._target_)
    if backbone == "TwoStream":
        backbone = (
            f"{_name(cfg.backbone.stream_a._target_)} x {_name(cfg.backbone.stream_b._target_)}"
        )
    elif backbone == "TimmBackbone":
        backbone = f"timm {cfg.backbone.name}"
    steps = [k for k, v in cfg.normalization.items() if k != "_target_" and v]
    return f"{backbone} | {_pooling(cfg.pooling)} | {', '.join(steps)}"


def _svm(cfg: DictConfig) -> bool:
    """Whether the classifier is fitted on cached descriptors (no optimizer, no epochs)."""
    return _name(cfg.classifier._target_) == "SVMClassifier"


def _classifier(cfg: DictConfig) -> str:
    node = cfg.classifier
    name = _name(node._target_)
    if name == "SVMClassifier":
        calibration = ", median calibration" if node.get("calibrate", True) else ""
        return f"SVMClassifier (one-vs-all, C {_num(float(node.C))}, {node.loss} loss{calibration})"
    init = node.get("init", "zeros")
    if init == "normal" and name == "LinearClassifier":
        init += f" std {_num(float(node.init_std))}, bias {_num(float(node.init_bias))}"
    if name == "LowRankBilinearClassifier":
        return f"{name} (rank {node.rank}, init {init})"
    return f"{name} (init {init})"


def _matrix_fields(cfg: DictConfig) -> dict[str, str]:
    for key, step in cfg.normalization.items():
        if key == "_target_" or not step or _name(step.get("_target_")) not in MATRIX_STEPS:
            continue
        kind = _name(step._target_)
        ridge = float(step.get("eps", 1e-4))
        mode = step.get("eps_mode", "trace")
        ridge_text = (
            "no ridge"
            if ridge == 0
            else (
                f"ridge {_num(ridge)} x mean eigenvalue"
                if mode == "trace"
                else f"ridge {_num(ridge)}"
            )
        )
        label = {"MatrixSqrt": "sqrt", "MatrixLog": "log"}.get(kind, f"power {step.get('p')}")
        if kind == "MatrixPower" and float(step.get("p", 0.5)) == 0.5:
            label = "power 0.5 (sqrt)"
        out = {"matrix.function": f"{label} (step {key}), {ridge_text}"}
        if kind == "MatrixLog":
            method = step.get("method", "eigh")
            out["matrix.train"] = f"{method}, backward exact"
            out["matrix.test"] = step.get("eval_method") or method
            return out
        if kind == "MatrixPower" and float(step.get("p", 0.5)) != 0.5:
            out["matrix.train"] = "eigh, backward exact"
            out["matrix.test"] = "eigh"
            return out

        def describe(method: str, iters: int) -> str:
            return f"newton_schulz {iters}" if method == "newton_schulz" else method

        method, iters = step.get("method", "newton_schulz"), int(step.get("iters", 5))
        backward = step.get("backward", "auto")
        if method != "auto":  # what "auto" resolves to (device-independent for a method)
            backward = resolve_sqrtm(method, backward)[1]
        out["matrix.train"] = f"{describe(method, iters)}, backward {backward}"
        test_method = step.get("eval_method") or method
        test_iters = iters if step.get("eval_iters") is None else int(step.eval_iters)
        out["matrix.test"] = describe(test_method, test_iters)
        return out
    return {}


def protocol_of(cfg: DictConfig) -> dict[str, str]:
    """The protocol fields (see the module docstring) of a composed config.

    Args:
        cfg: A config composed like ``train.py`` does (``experiment=<preset>`` ...).

    Returns:
        Field -> value, as ``protocols.csv`` writes them; fields that do not apply (a
        stage not run, no matrix step, no projection) are absent.
    """
    out: dict[str, str] = {"dataset": str(cfg.dataset.get("name")), "model": _model(cfg)}
    choices = cfg.get("hydra", {}).get("runtime", {}).get("choices", {}) if "hydra" in cfg else {}
    if choices.get("recipe"):
        out["recipe"] = str(choices["recipe"])
    out["input"], live = _input(cfg.dataset.get("transform"))
    out["train_augment"] = _augment(cfg, live)
    flip = "averaged with its mirror image" if cfg.trainer.test_flip else "alone"
    centre = "centre crop" if "crop" in out["input"] else "whole image"
    out["test_view"] = f"{centre}, {flip}"
    val = float(cfg.dataset.get("val_fraction", 0.0) or 0.0)
    out["training_split"] = "trainval" if val == 0 else f"train ({_num(val)} held out as val)"
    out["epoch_selection"] = "last" if val == 0 else "best validation"
    out["stages"] = ", ".join(cfg.trainer.stages)
    for stage in cfg.trainer.stages:
        if stage == "linear" and _svm(cfg):
            continue  # fitted on the cache, not by the stage's optimizer
        out.update(_stage_fields(cfg, stage))
    out["classifier"] = _classifier(cfg)
    out.update(_matrix_fields(cfg))
    signsqrt = cfg.normalization.get("signsqrt")
    if signsqrt:
        out["signsqrt.eps"] = _num(float(signsqrt.get("eps", 1e-8)))
    return out


@cache
def load_protocols() -> pd.DataFrame:
    """``bcnn/resources/protocols.csv`` as a DataFrame (read once)."""
    with resources.files("bcnn").joinpath("resources", PROTOCOLS).open() as f:
        df = pd.read_csv(f, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{PROTOCOLS} lacks the columns {missing}")
    return df


def expected(preset: str) -> dict[str, str]:
    """The table's field -> value for ``preset``; empty if the table does not list it."""
    df = load_protocols()
    rows = df[df["preset"] == preset]
    return dict(zip(rows["field"], rows["value"]))


def compose_preset(preset: str, dataset: str | None = None) -> DictConfig:
    """``train.py experiment=<preset> [dataset=<dataset>]`` as a composed config."""
    from hydra import compose, initialize_config_module

    import bcnn.config  # noqa: F401  (registers the schema)

    overrides = [f"experiment={preset}"] + ([f"dataset={dataset}"] if dataset else [])
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def differences(preset: str) -> list[str]:
    """Where ``preset`` composes to something else than the table says (empty: agrees)."""
    table = expected(preset)
    if not table:
        return [f"{preset}: not in {PROTOCOLS}"]
    df = load_protocols()
    dataset = df.loc[df["preset"] == preset, "dataset"].iloc[0] or None
    actual = protocol_of(compose_preset(preset, dataset))
    out = []
    for field in sorted(set(table) | set(actual), key=_field_order):
        if table.get(field) != actual.get(field):
            out.append(
                f"{preset}: {field}: table {table.get(field)!r}, config {actual.get(field)!r}"
            )
    return out


def _field_order(field: str) -> int:
    return FIELDS.index(field) if field in FIELDS else len(FIELDS)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def protocol_markdown(df: pd.DataFrame | None = None) -> str:
    """``docs/protocols.md``: the protocol table, grouped by recipe.

    For each recipe, the fields every preset of the group shares (same value, source and
    deviation) form one table; for the other fields, each variant is listed once with
    the presets that have it.
    """
    df = load_protocols() if df is None else df
    lines = [
        "# Protocols of the experiment presets",
        "",
        "Generated from `bcnn/resources/protocols.csv` by "
        "`python -m bcnn.reproduce.protocols --markdown`; the test suite checks that every "
        "preset of `configs/experiment/` composes to these values "
        "(`tests/test_reproduce_protocols.py`) and that this page matches the CSV. "
        "**Source**: where the value comes from (a paper's table, or a file of the authors' "
        "code: cvl-umass/bilinear-cnn at d6a05aa for PyTorch; tsungyu/bcnn, read from its "
        "mirror dendisuhubdy/bcnn at 54b7296, and tsungyu/o2dp for MATLAB). "
        "**Deviation**: what bcnn does differently, when it does. Values are those of the "
        "preset with its default dataset; `dataset=<name>` changes only the data fields. "
        "Field definitions: `bcnn/reproduce/protocols.py`.",
        "",
    ]
    recipe_of = {
        p: dict(zip(g["field"], g["value"])).get("recipe", "") for p, g in df.groupby("preset")
    }
    for recipe in sorted(set(recipe_of.values())):
        presets = sorted(p for p, r in recipe_of.items() if r == recipe)
        part = df[df["preset"].isin(presets)]
        shared, varied = [], []
        for field, rows in part.groupby("field", sort=False):
            variants: dict[tuple[str, str, str], list[str]] = {}
            for r in rows.itertuples():
                variants.setdefault((r.value, r.source, r.deviation), []).append(r.preset)
            if len(rows) == len(presets) and len(variants) == 1:
                shared.append((field, *next(iter(variants))))
            else:
                varied += [(field, *k, v) for k, v in variants.items()]
        shared.sort(key=lambda t: _field_order(t[0]))
        varied.sort(key=lambda t: (_field_order(t[0]), t[4]))
        lines += [f"## recipe `{recipe}`", "", "Presets: " + ", ".join(f"`{p}`" for p in presets)]
        lines += ["", "Shared by these presets:", ""]
        lines += ["| field | value | source | deviation |", "|---|---|---|---|"]
        lines += [f"| {f} | {_md(v)} | {_md(s)} | {_md(d)} |" for f, v, s, d in shared]
        if varied:
            lines += ["", "Per preset:", ""]
            lines += ["| field | value | presets | source | deviation |", "|---|---|---|---|---|"]
            lines += [
                f"| {f} | {_md(v)} | {', '.join(f'`{p}`' for p in ps)} | {_md(s)} | {_md(d)} |"
                for f, v, s, d, ps in varied
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Checks every preset against the table (exit 1 on a difference), or prints the docs."""
    parser = argparse.ArgumentParser(prog="python -m bcnn.reproduce.protocols")
    parser.add_argument("--markdown", action="store_true", help="print docs/protocols.md")
    parser.add_argument("presets", nargs="*", help="presets to check (default: all)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(protocol_markdown(), end="")
        return 0
    presets: Iterable[str] = args.presets or sorted(set(load_protocols()["preset"]))
    problems = [line for p in presets for line in differences(p)]
    print("\n".join(problems) if problems else "every preset agrees with the table")
    return 1 if problems else 0


__all__ = [
    "COLUMNS",
    "FIELDS",
    "compose_preset",
    "differences",
    "expected",
    "load_protocols",
    "protocol_markdown",
    "protocol_of",
]

if __name__ == "__main__":
    sys.exit(main())
