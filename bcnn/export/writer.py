"""Writes a trained model as safetensors, TorchScript or ONNX, with its metadata and card.

An export folder holds::

    model.safetensors | model.torchscript.pt | model.onnx   the model
    bcnn_export.json     classes, input convention, transform, notes, parity (also inside
                         the TorchScript and ONNX files)
    config.yaml          the run's resolved config
    README.md            the model card: config, accuracies, expected input, how to run it

TorchScript and ONNX hold the whole function from uint8 (or [0, 1] float) images to
logits: input normalization, backbone, pooling, the matrix functions (see
``bcnn.export.graph``) and the classifier. After writing, the file is loaded back and its
logits compared with the eager model's on check images; the largest difference goes into
the metadata and the card.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import bcnn
from bcnn.engine.checkpoint import load_checkpoint
from bcnn.engine.runs import TrainedModel
from bcnn.export.graph import exportable
from bcnn.export.runtime import (
    METADATA,
    ONNX_METADATA_KEY,
    load_predictor,
    onnx_module,
    quiet_jit,
)

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "torchscript", "onnx")
FILENAMES = {
    "safetensors": "model.safetensors",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
}
INPUT_DTYPES = ("uint8", "float")
ONNX_OPSET = 17
# Logit differences above this between the exported and the eager model are reported.
PARITY_WARN = 1e-3
# Default check and trace size when the run's config names none.
DEFAULT_SIZE = 224


@dataclass
class ExportResult:
    """What ``export_trained`` wrote.

    Attributes:
        folder: The export folder.
        model_file: The model inside it.
        metadata: The content of ``bcnn_export.json``.
        notes: Steps computed differently in the exported graph.
    """

    folder: Path
    model_file: Path
    metadata: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def example_size(config: DictConfig) -> int:
    """The image side the run evaluated at: the transform's ``size``, the dataset's
    ``image_size`` (the built-in dataset), else 224."""
    recipe = config.dataset.get("transform")
    if recipe and recipe.get("size"):
        return int(recipe.size)
    if config.dataset.get("image_size"):
        return int(config.dataset.image_size)
    return DEFAULT_SIZE


def _accuracies(trained: TrainedModel) -> dict[str, Any]:
    results = trained.run_dir / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        keys = ("test_acc", "test_mean_class_acc", "val_acc", "val_mean_class_acc", "dataset")
        out = {k: data.get(k) for k in keys}
        out["stages"] = data.get("stages", {})
        out["source"] = str(results)
        return out
    stages = load_checkpoint(trained.checkpoint).get("stage_results") or {}
    return {"stages": stages, "source": f"{trained.checkpoint} (run not finished)"}


def _check_images(size: int, count: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=gen)


def _trace_input(images: torch.Tensor, input_dtype: str) -> torch.Tensor:
    return images.float() / 255.0 if input_dtype == "float" else images


def _write_torchscript(
    model: torch.nn.Module, example: torch.Tensor, file: Path, meta: str
) -> None:
    with torch.no_grad(), quiet_jit():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(file), _extra_files={METADATA: meta})


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, file: Path, meta: str) -> None:
    onnx = onnx_module()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: seconds where the dynamo exporter takes minutes
        # on the unrolled matrix iterations, and the graph is traceable by construction.
        torch.onnx.export(
            model,
            (example,),
            str(file),
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    proto = onnx.load(str(file))
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: meta})
    onnx.save(proto, str(file))


def _write_safetensors(model: torch.nn.Module, file: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(file), metadata={"format": "pt", "bcnn_export": "1"})


def _embed(file: Path, fmt: str, meta: str) -> None:
    """Puts the final metadata into the TorchScript or ONNX file (safetensors exports keep
    it beside the weights only)."""
    if fmt == "torchscript":
        with quiet_jit():
            torch.jit.save(torch.jit.load(str(file)), str(file), _extra_files={METADATA: meta})
    elif fmt == "onnx":
        onnx = onnx_module()
        proto = onnx.load(str(file))
        onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: meta})
        onnx.save(proto, str(file))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _check_arguments(fmt: str, input_dtype: str) -> None:
    """Raises ValueError naming an unknown format or input dtype."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; choose one of {FORMATS}")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"Unknown input dtype {input_dtype!r}; choose one of {INPUT_DTYPES}")


def _metadata(
    trained: TrainedModel, fmt: str, file: Path, size: int, input_dtype: str, notes: list[str]
) -> dict[str, Any]:
    """The content of ``bcnn_export.json`` before the parity check.

    Args:
        trained: The run.
        fmt: The export format.
        file: The model file.
        size: Side of the trace and check images.
        input_dtype: ``uint8`` or ``float``.
        notes: The export notes (the same list: notes added later show in the metadata).
    """
    spec = trained.model.input_spec
    recipe = trained.config.dataset.get("transform")
    return {
        "bcnn_export": 1,
        "format": fmt,
        "file": file.name,
        "classes": list(trained.classes),
        "input": {
            "name": "images",
            # What bcnn-predict feeds a safetensors export; floats in [0, 1] work too.
            "dtype": "uint8" if fmt == "safetensors" else input_dtype,
            "range": [0, 255] if input_dtype == "uint8" else [0.0, 1.0],
            "layout": "NCHW",
            "channels": "RGB",
            "size": [size, size],
            "dynamic_axes": ["batch", "height", "width"],
            "fixed_size": None,
            "normalized_inside": {
                "mean": list(spec.mean),
                "std": list(spec.std),
                "color": spec.color,
                "scale": spec.scale,
            },
        },
        "output": {"name": "logits", "shape": ["batch", len(trained.classes)]},
        "transform": OmegaConf.to_container(recipe) if recipe else None,
        "test_flip": bool(trained.config.trainer.test_flip),
        "notes": notes,
        "source": {"checkpoint": str(trained.checkpoint), "run_dir": str(trained.run_dir)},
        "accuracies": _accuracies(trained),
        "versions": {"bcnn": bcnn.__version__, "torch": torch.__version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_model(
    fmt: str,
    graph: torch.nn.Module,
    model: torch.nn.Module,
    example: torch.Tensor,
    file: Path,
    meta: dict[str, Any],
) -> None:
    """Writes the exported ``graph`` (TorchScript, ONNX) or the eager ``model``'s weights."""
    if fmt == "torchscript":
        _write_torchscript(graph, example, file, json.dumps(meta))
    elif fmt == "onnx":
        _write_onnx(graph, example, file, json.dumps(meta))
    else:
        _write_safetensors(model, file)


def _mark_fixed_size(meta: dict[str, Any], size: int) -> None:
    """Records in ``meta`` (input and notes) that the graph runs only at ``size``."""
    meta["input"]["fixed_size"] = [size, size]
    meta["input"]["dynamic_axes"] = ["batch"]
    meta["notes"].append(
        f"the exported graph runs only at {size}x{size}: resize images to that size "
        "(bcnn-predict does)"
    )


def export_trained(
    trained: TrainedModel,
    fmt: str,
    out_dir: str | Path,
    *,
    image_size: int | None = None,
    input_dtype: str = "uint8",
) -> ExportResult:
    """Exports a trained model into ``out_dir`` (created; existing files are replaced).

    Args:
        trained: From ``bcnn.engine.runs.load_trained``.
        fmt: One of ``FORMATS``.
        out_dir: The export folder.
        image_size: Side of the trace and check images (default: ``example_size``).
        input_dtype: ``uint8`` (0-255 images) or ``float`` ([0, 1]); the graph normalizes
            either itself. Safetensors exports take both.

    Returns:
        What was written.

    Raises:
        ValueError: an unknown format or input dtype, or a model step with no exportable
            form (naming its config key).
        ImportError: ONNX export without the onnx package.
    """
    _check_arguments(fmt, input_dtype)
    size = int(image_size or example_size(trained.config))
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    model = trained.model.cpu().eval()
    graph, plan = (model, None) if fmt == "safetensors" else exportable(model)
    notes = [] if plan is None else list(plan.notes)
    for note in notes:
        log.info("Export note: %s", note)
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / FILENAMES[fmt]
    meta = _metadata(trained, fmt, file, size, input_dtype, notes)
    OmegaConf.save(trained.config, folder / "config.yaml")
    images = _check_images(size)
    _write_model(fmt, graph, model, _trace_input(images, input_dtype), file, meta)
    meta["parity"] = _parity(model, folder, file, meta, images, input_dtype)
    if meta["parity"].get("fixed_size"):
        _mark_fixed_size(meta, size)
    _embed(file, fmt, json.dumps(meta))
    (folder / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(meta, trained.config))
    log.debug("Exported %s to %s", fmt, file)
    return ExportResult(folder, file, meta, notes)


def reference_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The eager model's logits computed in float64: the exact value of its function.

    The float32 eager model is not exact either: an eigendecomposition or an FFT in
    float32, followed by the signed square root (whose slope is large near 0), is off by
    up to ~1e-3 in the logits. Exported graphs are measured against this reference, and
    the float32 eager model's own distance from it is reported beside.

    Args:
        model: The eager model (not changed).
        images: uint8 (B, 3, H, W) or floats in [0, 1].

    Returns:
        (B, num_classes) float64.
    """
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(images)


def _parity(
    model: torch.nn.Module,
    folder: Path,
    file: Path,
    meta: dict[str, Any],
    images: torch.Tensor,
    input_dtype: str,
) -> dict[str, Any]:
    """Largest logit differences of the exported file, at the export size and another."""
    (folder / METADATA).write_text(json.dumps(meta))
    try:
        exported = load_predictor(file if file.suffix != ".safetensors" else folder)
    except ImportError as err:
        log.warning("Exported model not checked: %s", err)
        return {"checked": False, "reason": str(err)}
    size = images.shape[-1]
    other = _check_images(size + 16 if size < 64 else size - 32)
    report: dict[str, Any] = {
        "checked": True,
        "reference": "the eager model in float64",
        "images": "random uint8 noise, 2 per size",
    }
    for key, batch in (("at_size", images), ("other_size", other)):
        inputs = _trace_input(batch, input_dtype)
        reference = reference_logits(model, inputs)
        with torch.no_grad():
            eager = model(inputs)
        try:
            out = exported.logits(batch)
        except Exception as err:  # a graph with sizes baked in fails at another size
            if key == "at_size":
                raise
            log.info("The exported graph does not run at another size: %s", err)
            out = torch.full_like(eager, math.nan)
        report[key] = {
            "size": list(batch.shape[-2:]),
            "exported_vs_float64": _max_diff(out, reference),
            "eager_float32_vs_float64": _max_diff(eager, reference),
            "exported_vs_eager_float32": _max_diff(out, eager),
        }
    other_err = report["other_size"]
    bound = max(PARITY_WARN, 2 * other_err["eager_float32_vs_float64"])
    report["fixed_size"] = not other_err["exported_vs_float64"] <= bound
    at = report["at_size"]
    if not at["exported_vs_float64"] <= max(PARITY_WARN, 2 * at["eager_float32_vs_float64"]):
        log.warning(
            "The exported model's logits differ from the eager model's (float64) by up to "
            "%.3g on the check images, the float32 eager model's by %.3g: see %s",
            at["exported_vs_float64"], at["eager_float32_vs_float64"], folder / "README.md",
        )  # fmt: skip
    return report


def _fmt_acc(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.2f}%"


# The README.md of an export folder; ``model_card`` fills the fields (str.format: a
# literal brace is written doubled).
MODEL_CARD = """\
# bcnn model: {title}

Exported by `bcnn-export` ({format}, bcnn {bcnn_version}, torch
{torch_version}) on {created} from `{checkpoint}`.

File: `{file}`. Metadata (classes, input, transform, checks): `{metadata}`.
Full training config: `config.yaml`.

## Expected input

- `images`: {pixel}, shape (batch, 3, height, width), RGB channel order.
- Height and width: {size_line}.
- Normalization happens inside the model: mean {mean}, std
  {std} on [0, 1] pixels ({color},
  scale {scale}); do not normalize beforehand.
- Preprocessing: {preprocessing}.
- Output `logits` (batch, {num_classes}); probabilities are their softmax.
  {flip}

`bcnn-predict {file} <images or folders>` applies all of this. In Python:

{run}

## Accuracies (from training)

{accuracies}

Source: {source}.

## Model

```yaml
{parts}
```

## Export notes

{notes}

{check}

## Classes

{classes}
"""

# How to run the exported file, per format (fields: file, pixel).
RUN_SNIPPETS = {
    "onnx": (
        "```python\nimport numpy as np, onnxruntime as ort\n"
        'session = ort.InferenceSession("{file}")\n'
        "# images: {pixel} (B, 3, H, W)\n"
        'logits = session.run(None, {{"images": images}})[0]\n```'
    ),
    "torchscript": (
        "```python\nimport torch\n"
        'model = torch.jit.load("{file}")\n'
        "logits = model(images)   # images: {pixel} (B, 3, H, W)\n```"
    ),
    "safetensors": (
        "```python\nfrom bcnn.export.runtime import load_predictor\n"
        'predictor = load_predictor(".")            # this folder\n'
        "probs = predictor.probabilities(images)    # uint8 (B, 3, H, W)\n```"
    ),
}


def _model_parts(config: DictConfig) -> str:
    """The backbone, pooling, normalization and classifier config as YAML."""
    keys = ("backbone", "pooling", "normalization", "classifier")
    parts = OmegaConf.create({k: OmegaConf.to_container(config[k]) for k in keys})
    return OmegaConf.to_yaml(parts).rstrip()


def _pixels(meta: dict[str, Any]) -> str:
    """The pixel type and range the exported file takes."""
    if meta["format"] == "safetensors":
        return "uint8 (0-255) or float32 in [0, 1]"
    return "uint8, 0-255" if meta["input"]["dtype"] == "uint8" else "float32 in [0, 1]"


def _preprocessing(recipe: Any) -> str:
    """The card's preprocessing line for the run's transform ``recipe`` (or None)."""
    if not recipe:
        return "none: images at their own size (the run's dataset had no resize recipe)"
    return (
        f"the evaluation transform of training: `{json.dumps(recipe)}` (resize / centre crop, "
        "see `bcnn.data.transforms.build_transforms`)"
    )


def _accuracy_table(acc: dict[str, Any]) -> str:
    """Markdown table of the run's test / val accuracies and the test accuracy per stage."""
    rows = [
        "| split | top-1 | mean per class |",
        "|---|---:|---:|",
        f"| test | {_fmt_acc(acc.get('test_acc'))} | {_fmt_acc(acc.get('test_mean_class_acc'))} |",
        f"| val | {_fmt_acc(acc.get('val_acc'))} | {_fmt_acc(acc.get('val_mean_class_acc'))} |",
    ]
    for stage, values in (acc.get("stages") or {}).items():
        rows.append(
            f"| test after stage `{stage}` | {_fmt_acc(values.get('test_acc'))} | "
            f"{_fmt_acc(values.get('test_mean_class_acc'))} |"
        )
    return "\n".join(rows)


def _parity_text(parity: dict[str, Any]) -> str:
    """The parity check of ``_parity`` as a Markdown table, or why there was none."""
    if not parity.get("checked"):
        return f"Not checked after export ({parity.get('reason', 'no runtime')})."
    return "\n".join(
        [
            "Logits on random check images, largest absolute difference:",
            "",
            "| size | exported vs eager (float64) | eager float32 vs float64 |",
            "|---|---:|---:|",
            *(
                f"| {r['size'][0]}x{r['size'][1]} | {r['exported_vs_float64']:.2e} | "
                f"{r['eager_float32_vs_float64']:.2e} |"
                for r in (parity["at_size"], parity["other_size"])
            ),
        ]
    )


def model_card(meta: dict[str, Any], config: DictConfig) -> str:
    """The README.md of an export folder: ``MODEL_CARD`` filled from the metadata."""
    inp, acc, classes = meta["input"], meta["accuracies"], meta["classes"]
    pixel = _pixels(meta)
    h, w = inp["size"]
    size_line = f"only {h}x{w}" if inp.get("fixed_size") else f"any (traced and checked at {h}x{w})"
    norm = inp["normalized_inside"]
    flip = (
        "The run averaged the probabilities of each image and its mirror image (trainer.test_flip)."
        if meta["test_flip"]
        else "The run evaluated without flip averaging."
    )
    shown = ", ".join(classes[:30]) + (
        f", ... ({len(classes)} in all)" if len(classes) > 30 else ""
    )
    return MODEL_CARD.format(
        title=f"{acc.get('dataset') or config.dataset.get('name', '?')}, {len(classes)} classes",
        format=meta["format"],
        bcnn_version=meta["versions"]["bcnn"],
        torch_version=meta["versions"]["torch"],
        created=meta["created"],
        checkpoint=meta["source"]["checkpoint"],
        file=meta["file"],
        metadata=METADATA,
        pixel=pixel,
        size_line=size_line,
        mean=norm["mean"],
        std=norm["std"],
        color=norm["color"],
        scale=norm["scale"],
        preprocessing=_preprocessing(meta.get("transform")),
        num_classes=len(classes),
        flip=flip,
        run=RUN_SNIPPETS[meta["format"]].format(file=meta["file"], pixel=pixel),
        accuracies=_accuracy_table(acc),
        source=acc.get("source", "n/a"),
        parts=_model_parts(config),
        notes="\n".join(f"- {n}" for n in meta["notes"]) or "- none: every step exports as it runs",
        check=_parity_text(meta.get("parity", {})),
        classes=shown,
    )


__all__ = ["FILENAMES", "FORMATS", "ExportResult", "example_size", "export_trained", "model_card"]
