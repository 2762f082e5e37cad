"""Every experiment preset's protocol against ``bcnn/resources/protocols.csv`` (one line per
(preset, field): value, source, deviation; fields defined in ``protocol_fields.csv``).

:func:`protocol_of` reads the fields off a composed config; :func:`protocol_markdown` writes
``docs/protocols.md`` from the CSV. ``python -m bcnn.reproduce.protocols [--markdown]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from typing import Any

import pandas as pd
import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from bcnn.models.normalization import MatrixStep
from bcnn.ops import resolve_sqrtm
from bcnn.reproduce.launch import compose_train
from bcnn.reproduce.tables import read_resource

PROTOCOLS = "protocols.csv"
COLUMNS = ("preset", "dataset", "field", "value", "source", "deviation")
DEFINITIONS = read_resource("protocol_fields.csv", dtype=str, keep_default_na=False)
# The fields in table order; the (contiguous) ``<stage>.*`` ones once per stage.
_NAMES = list(DEFINITIONS["field"])
_STAGE = [i for i, n in enumerate(_NAMES) if n.startswith("<stage>.")]
FIELDS = tuple(
    _NAMES[: _STAGE[0]]
    + [_NAMES[i].replace("<stage>", s) for s in ("linear", "finetune") for i in _STAGE]
    + _NAMES[_STAGE[-1] + 1 :]
)


def _name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1]


def _num(value: Any) -> str:
    """A number as the table writes it: ``1e-05``, ``0.9``, ``16``."""
    return f"{float(value):g}"


def _schedule(node: DictConfig) -> str:
    if "step_size" in node:
        return f"x{_num(node.gamma)} every {node.step_size} epochs"
    if "patience" in node:
        return (
            f"x{_num(node.factor)} after {node.patience} epochs without a better "
            f"validation accuracy (ReduceLROnPlateau, mode {node.mode})"
        )
    if "T_max" in node:
        return "cosine to 0"
    if "total_iters" in node:
        factor = float(node.get("factor", 1.0))
        return "constant" if factor == 1.0 else f"constant x{node.factor}"
    return _name(node._target_)


def _stage_fields(cfg: DictConfig, name: str) -> dict[str, str]:
    stage = cfg.trainer[name]
    node = stage.optimizer
    # bcnn.reproduce.optim.with_groups names the optimizer and its per-group settings.
    cls = get_class(node.get("optimizer", node._target_))
    opt = cls.__name__
    groups = {k: dict(v) for k, v in (node.get("groups") or {}).items()}
    reset = ", state reset every epoch" if stage.get("reset_optimizer_each_epoch") else ""
    out = {"optimizer": opt + reset, "lr": _num(stage.lr)}
    if name == "finetune":
        out["backbone_lr"] = _num(stage.backbone_lr)
    if cfg.pooling.get("proj_dim"):
        scale = float(cfg.pooling.get("proj_lr_scale", 1.0))
        out["proj_lr"] = _num(groups.get("proj", {}).get("lr", float(stage.lr) * scale))
    if "momentum" in node:
        out["momentum"] = _num(node.momentum)
    if "betas" in node:
        out["betas"] = ", ".join(_num(b) for b in node.betas)
        out["eps"] = _num(node.get("eps", 1e-8))
    kind = "decoupled" if issubclass(cls, torch.optim.AdamW) else "coupled"
    out["weight_decay"] = f"{_num(node.get('weight_decay', 0.0))} ({kind})"
    decays = {g: s["weight_decay"] for g, s in sorted(groups.items()) if "weight_decay" in s}
    if decays:
        out["group_decay"] = ", ".join(f"{g}: {_num(d)}" for g, d in decays.items())
    out["epochs"] = str(stage.epochs)
    out["batch"] = str(int(stage.batch_size) * int(stage.grad_accum))
    out["schedule"] = _schedule(stage.scheduler)
    return {f"{name}.{k}": v for k, v in out.items()}


def _input(transform: DictConfig | None) -> tuple[str, str]:
    """(``input``, the augmentation of live images) of a dataset's transform recipe."""
    if not transform:
        return "generated at its own size", "none"
    recipe, size = transform.get("recipe", "short_side"), int(transform.get("size", 448))
    text, crop = f"short side {size}, crop {size}x{size}", True
    if recipe == "square":
        text, crop = f"resize to {size}x{size}", False
    elif recipe == "resize_crop":
        resize = int(transform.get("resize") or round(size * 8 / 7))
        text = f"resize to {resize}x{resize}, crop {size}x{size}"
    parts = (("random crop", crop), ("flip", bool(transform.get("hflip", True))))
    return text, " + ".join(p for p, on in parts if on) or "none"


def _augment(cfg: DictConfig, live: str) -> str:
    """What each stage trains on: the linear stage of a model whose only trainable layer is
    the classifier reads cached descriptors of the centre view (and of its mirror image
    when the recipe flips), the other stages the augmented images."""
    transform = cfg.dataset.get("transform")
    cache_on = str(cfg.trainer.get("cache_features", "auto")).lower() != "false"
    parts = []
    for stage in cfg.trainer.stages:
        if stage == "linear" and cache_on and not cfg.pooling.get("proj_dim") and transform:
            flip = " and its mirror image" if transform.get("hflip", True) else ""
            view = "centre crop" if "crop" in _input(transform)[0] else "whole image"
            parts.append(f"{stage}: cached {view}{flip}")
        else:
            parts.append(f"{stage}: {live}")
    return "; ".join(parts)


def _pooling(node: DictConfig) -> str:
    name = _name(node._target_)
    if "gamma" in node:  # (gamma-)democratic weights
        name += f" (gamma {_num(node.gamma)})"
    elif "sketch" in node:
        sketch = node.sketch
        gamma = f", gamma {_num(sketch.gamma)}" if "gamma" in sketch else ""
        name += f" ({_name(sketch._target_)} {sketch.out_dim}{gamma})"
    elif "num_components" in node:  # a Fisher vector
        name += (
            f" ({node.num_components} components, {node.num_samples} samples, at most "
            f"{node.samples_per_image} per image)"
        )
    return f"1x1 conv to {node.proj_dim}, {name}" if node.get("proj_dim") else name


def _model(cfg: DictConfig) -> str:
    node = cfg.backbone
    backbone = _name(node._target_)
    if "stream_a" in node:
        backbone = f"{_name(node.stream_a._target_)} x {_name(node.stream_b._target_)}"
    elif "name" in node:  # a timm model
        backbone = f"timm {node.name}"
    steps = [k for k, v in cfg.normalization.items() if k != "_target_" and v]
    return f"{backbone} | {_pooling(cfg.pooling)} | {', '.join(steps)}"


def _classifier(node: DictConfig) -> str:
    name = _name(node._target_)
    if getattr(get_class(node._target_), "trains_on_cache", False):  # the SVMs
        calibration = ", median calibration" if node.get("calibrate", True) else ""
        return f"{name} (one-vs-all, C {_num(node.C)}, {node.loss} loss{calibration})"
    init = node.get("init", "zeros")
    if init == "normal" and node.get("init_std") is not None:
        init += f" std {_num(node.init_std)}, bias {_num(node.init_bias)}"
    rank = f"rank {node.rank}, " if "rank" in node else ""
    return f"{name} ({rank}init {init})"


def _root(method: str, iters: int) -> str:
    return f"newton_schulz {iters}" if method == "newton_schulz" else method


def _matrix_fields(cfg: DictConfig) -> dict[str, str]:
    """The fields of the chain's first matrix step."""
    steps = [(k, s) for k, s in cfg.normalization.items() if k != "_target_" and s]
    for key, step in steps:
        if not issubclass(get_class(step._target_), MatrixStep):
            continue
        ridge, kind = float(step.get("eps", 1e-4)), _name(step._target_)
        scale = " x mean eigenvalue" if step.get("eps_mode") == "trace" else ""
        ridge_text = f"ridge {_num(ridge)}{scale}" if ridge else "no ridge"
        p = float(step.get("p", 0.5))
        label = {"MatrixSqrt": "sqrt", "MatrixLog": "log"}.get(kind, f"power {step.get('p')}")
        label = "power 0.5 (sqrt)" if label == "power 0.5" else label
        out = {"matrix.function": f"{label} (step {key}), {ridge_text}"}
        if kind == "MatrixLog" or p != 0.5:
            method = step.get("method", "eigh") if kind == "MatrixLog" else "eigh"
            test = step.get("eval_method") or method
            return {**out, "matrix.train": f"{method}, backward exact", "matrix.test": test}
        method, iters = step.get("method", "newton_schulz"), int(step.get("iters", 5))
        backward = step.get("backward", "auto")
        if method != "auto":  # what "auto" resolves to (device-independent for a method)
            backward = resolve_sqrtm(method, backward)[1]
        test_iters = iters if step.get("eval_iters") is None else int(step.eval_iters)
        out["matrix.train"] = f"{_root(method, iters)}, backward {backward}"
        out["matrix.test"] = _root(step.get("eval_method") or method, test_iters)
        return out
    return {}


def protocol_of(cfg: DictConfig) -> dict[str, str]:
    """The protocol fields (``bcnn/resources/protocol_fields.csv``) of a composed config.

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
    out["test_view"] = f"{'centre crop' if 'crop' in out['input'] else 'whole image'}, {flip}"
    val = float(cfg.dataset.get("val_fraction", 0.0) or 0.0)
    out["training_split"] = "trainval" if val == 0 else f"train ({_num(val)} held out as val)"
    out["epoch_selection"] = "last" if val == 0 else "best validation"
    out["stages"] = ", ".join(cfg.trainer.stages)
    fitted = getattr(get_class(cfg.classifier._target_), "trains_on_cache", False)
    for stage in cfg.trainer.stages:
        if not (stage == "linear" and fitted):  # an SVM is fitted, not trained by a stage
            out.update(_stage_fields(cfg, stage))
    out["classifier"] = _classifier(cfg.classifier)
    out.update(_matrix_fields(cfg))
    if signsqrt := cfg.normalization.get("signsqrt"):
        out["signsqrt.eps"] = _num(signsqrt.get("eps", 1e-8))
    return out


@cache
def load_protocols() -> pd.DataFrame:
    """``bcnn/resources/protocols.csv`` (columns :data:`COLUMNS`), read once."""
    return read_resource(PROTOCOLS, dtype=str, keep_default_na=False)


def differences(preset: str) -> list[str]:
    """Where ``preset`` composes to something else than the table says (empty: agrees)."""
    rows = load_protocols()[load_protocols()["preset"] == preset]
    if rows.empty:
        return [f"{preset}: not in {PROTOCOLS}"]
    table, dataset = dict(zip(rows["field"], rows["value"])), rows["dataset"].iloc[0]
    overrides = [f"experiment={preset}"] + ([f"dataset={dataset}"] if dataset else [])
    actual = protocol_of(compose_train(overrides, hydra=True))
    return [
        f"{preset}: {field}: table {table.get(field)!r}, config {actual.get(field)!r}"
        for field in sorted(set(table) | set(actual), key=_field_order)
        if table.get(field) != actual.get(field)
    ]


def _field_order(field: str) -> int:
    return FIELDS.index(field) if field in FIELDS else len(FIELDS)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    cells = [header, ["---"] * len(header), *rows]
    return ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]


def protocol_markdown() -> str:
    """``docs/protocols.md``: ``bcnn/resources/protocols_page.md``, the field definitions,
    then one table per recipe, each (field, value, source, deviation) once with the presets
    that have it (``all``: every preset of the recipe)."""
    df = load_protocols()
    page = (resources.files("bcnn") / "resources" / "protocols_page.md").read_text()
    fields = ((f"`{f}`", m) for f, m in DEFINITIONS.values)
    lines = [page.rstrip("\n"), "", *_md_table(("field", "meaning"), fields), ""]
    recipe_of = df[df["field"] == "recipe"].set_index("preset")["value"]
    for recipe, part in df.groupby(df["preset"].map(recipe_of).fillna("")):
        presets = sorted(set(part["preset"]))
        rows = []
        for (field, *text), group in part.groupby(["field", "value", "source", "deviation"]):
            who = sorted(group["preset"])
            presets_text = "all" if who == presets else ", ".join(f"`{p}`" for p in who)
            rows.append((field, text[0], presets_text, *text[1:]))
        rows.sort(key=lambda r: (_field_order(r[0]), r[2] != "all", r[2]))
        lines += [f"## recipe `{recipe}`", "", "Presets: " + ", ".join(f"`{p}`" for p in presets)]
        lines += ["", *_md_table(("field", "value", "presets", "source", "deviation"), rows), ""]
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


if __name__ == "__main__":
    sys.exit(main())
