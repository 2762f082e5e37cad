"""Writes a trained model as safetensors, TorchScript or ONNX, with ``bcnn_export.json``, the
run's ``config.yaml`` and a model card ``README.md`` (``bcnn/resources/model_card.yaml``).
The written file is loaded back and checked against the eager model (``parity``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

import bcnn
from bcnn.engine.checkpoint import load_checkpoint
from bcnn.engine.runs import TrainedModel
from bcnn.export.graph import exportable
from bcnn.export.parity import check, natural_images, parity_text
from bcnn.export.runtime import METADATA, ONNX_METADATA_KEY, optional_module, quiet_jit

log = logging.getLogger(__name__)

FILENAMES = {
    "safetensors": "model.safetensors",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
}
FORMATS = tuple(FILENAMES)
INPUT_DTYPES = ("uint8", "float")
ONNX_OPSET = 17
CARD = "model_card.yaml"
MODEL_PARTS = ("backbone", "pooling", "normalization", "classifier")  # the card's config
# Export size when the run's config names none (no transform size, no image_size).
DEFAULT_SIZE = 224


@dataclass
class ExportResult:
    """What ``export_trained`` wrote: the ``model_file`` in ``folder``, the content of
    ``bcnn_export.json`` and the ``notes`` on steps computed differently in the graph."""

    folder: Path
    model_file: Path
    metadata: dict[str, Any]
    notes: list[str]


def _accuracies(trained: TrainedModel) -> dict[str, Any]:
    results = trained.run_dir / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        keys = ("test_acc", "test_mean_class_acc", "val_acc", "val_mean_class_acc", "dataset")
        found = {k: data.get(k) for k in keys}
        return found | {"stages": data.get("stages", {}), "source": str(results)}
    stages = load_checkpoint(trained.checkpoint).get("stage_results") or {}
    return {"stages": stages, "source": f"{trained.checkpoint} (run not finished)"}


def _write_model(
    fmt: str, graph: torch.nn.Module, model: torch.nn.Module, example: torch.Tensor, file: Path
) -> None:
    """Writes the exported ``graph`` (TorchScript, ONNX) or the eager ``model``'s weights."""
    with torch.no_grad(), quiet_jit(), warnings.catch_warnings():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(graph, example, check_trace=False), str(file))
        elif fmt == "onnx":
            optional_module("onnx")
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter: seconds where the dynamo exporter takes
            # minutes on the unrolled matrix iterations; the graph is traceable by design.
            torch.onnx.export(
                graph,
                (example,),
                str(file),
                dynamo=False,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={
                    "images": {0: "batch", 2: "height", 3: "width"},
                    "logits": {0: "batch"},
                },
                opset_version=ONNX_OPSET,
            )
        else:
            from safetensors.torch import save_model

            save_model(model, str(file), metadata={"format": "pt", "bcnn_export": "1"})


def _embed(file: Path, fmt: str, meta: str) -> None:
    """Puts the metadata into a TorchScript or ONNX file (safetensors: beside it only)."""
    if fmt == "torchscript":
        with quiet_jit():
            torch.jit.save(torch.jit.load(str(file)), str(file), _extra_files={METADATA: meta})
    elif fmt == "onnx":
        onnx = optional_module("onnx")
        proto = onnx.load(str(file))
        onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: meta})
        onnx.save(proto, str(file))


def _metadata(
    trained: TrainedModel, fmt: str, file: Path, size: int, input_dtype: str, notes: list[str]
) -> dict[str, Any]:
    """The content of ``bcnn_export.json`` before the parity check."""
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
            "normalized_inside": {**asdict(spec), "mean": list(spec.mean), "std": list(spec.std)},
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
        image_size: Side of the trace image and of the first check images (default: the
            run's evaluation size: its transform's ``size``, the dataset's ``image_size``).
        input_dtype: ``uint8`` (0-255 images) or ``float`` ([0, 1]); the graph normalizes
            either itself. Safetensors exports take both.

    Returns:
        What was written.

    Raises:
        ValueError: an unknown format or input dtype, or a step with no exportable form.
        ImportError: ONNX export without the onnx package.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; choose one of {FORMATS}")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"Unknown input dtype {input_dtype!r}; choose one of {INPUT_DTYPES}")
    dataset = trained.config.dataset
    recipe_size = (dataset.get("transform") or {}).get("size")
    size = int(image_size or recipe_size or dataset.get("image_size") or DEFAULT_SIZE)
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    model = trained.model.cpu().eval()
    graph, notes = (model, []) if fmt == "safetensors" else exportable(model)
    for note in notes:
        log.info("Export note: %s", note)
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / FILENAMES[fmt]
    meta = _metadata(trained, fmt, file, size, input_dtype, list(notes))
    OmegaConf.save(trained.config, folder / "config.yaml")
    example = natural_images(size, count=2)
    _write_model(
        fmt, graph, model, example.float() / 255 if input_dtype == "float" else example, file
    )
    meta["parity"] = check(model, meta, file, trained.config, input_dtype)
    _embed(file, fmt, json.dumps(meta))
    (folder / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(meta, trained.config))
    log.debug("Exported %s to %s", fmt, file)
    return ExportResult(folder, file, meta, notes)


def _accuracy_table(acc: dict[str, Any]) -> str:
    """Markdown table of the run's test / val accuracies and the test accuracy per stage."""
    rows = [("test", acc, "test"), ("val", acc, "val")]
    rows += [(f"test after stage `{s}`", v, "test") for s, v in (acc.get("stages") or {}).items()]
    lines = ["| split | top-1 | mean per class |", "|---|---:|---:|"]
    for name, values, split in rows:
        cells = (values.get(f"{split}_acc"), values.get(f"{split}_mean_class_acc"))
        shown = ("n/a" if v is None else f"{float(v):.2f}%" for v in cells)
        lines.append(f"| {name} | {' | '.join(shown)} |")
    return "\n".join(lines)


def model_card(meta: dict[str, Any], config: DictConfig) -> str:
    """The README.md of an export folder: ``bcnn/resources/model_card.yaml`` filled in."""
    text = yaml.safe_load(resources.files("bcnn.resources").joinpath(CARD).read_text())
    inp, acc, classes = meta["input"], meta["accuracies"], meta["classes"]
    pixel = text["pixels"]["safetensors" if meta["format"] == "safetensors" else inp["dtype"]]
    (h, w), recipe = inp["size"], meta.get("transform")
    shown = classes[:30] + ([f"... ({len(classes)} in all)"] if len(classes) > 30 else [])
    return text["card"].format(
        meta=meta,
        norm=inp["normalized_inside"],
        title=f"{acc.get('dataset') or config.dataset.get('name', '?')}, {len(classes)} classes",
        pixel=pixel,
        size_line=f"only {h}x{w}" if inp["fixed_size"] else f"any (traced and checked at {h}x{w})",
        preprocessing=text["preprocessing"]["recipe" if recipe else "none"].format(
            recipe=json.dumps(recipe)
        ),
        num_classes=len(classes),
        flip=text["flip"][bool(meta["test_flip"])],
        run=text["run"][meta["format"]].format(file=meta["file"], pixel=pixel),
        accuracies=_accuracy_table(acc),
        parts=OmegaConf.to_yaml({k: config[k] for k in MODEL_PARTS}).rstrip(),
        notes="\n".join(f"- {n}" for n in meta["notes"]) or "- none: every step exports as it runs",
        check=parity_text(meta.get("parity", {})),
        classes=", ".join(shown),
    )
