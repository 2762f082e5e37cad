"""Class probabilities from any trained model: a run, a checkpoint or an exported model.

``load_predictor`` returns a :class:`Predictor`: class names, the run's evaluation transform
and ``probabilities(images)``, flip-averaged as the run evaluated (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model

from bcnn.data.transforms import build_transforms
from bcnn.engine.placement import resolve_device
from bcnn.engine.runs import load_trained, rebuild_model

METADATA = "bcnn_export.json"
# ONNX metadata_props key holding the same JSON.
ONNX_METADATA_KEY = "bcnn_export"


@dataclass
class Predictor:
    """A model ready to score images.

    Attributes:
        classes: Class names; ``classes[i]`` names output i.
        transform: The run's evaluation transform: PIL image -> uint8 (3, H, W).
        flip: Average the probabilities of each image and its mirror image.
        kind: ``checkpoint``, ``safetensors``, ``torchscript`` or ``onnx``.
        run_logits: The model: images on ``device`` -> logits.
        input_dtype: What the model takes: ``uint8`` (0-255) or ``float`` ([0, 1]).
        fixed_size: (H, W) the model only runs at, or None (any size).
        device: Where ``run_logits`` takes its input.
    """

    classes: list[str]
    transform: Callable[[Any], torch.Tensor]
    flip: bool
    kind: str
    run_logits: Callable[[torch.Tensor], torch.Tensor]
    input_dtype: str = "uint8"
    fixed_size: tuple[int, int] | None = None
    device: str | torch.device = "cpu"

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> float32 logits (B, num_classes) on the CPU."""
        if images.dtype != torch.uint8:
            raise ValueError(f"Predictor.logits expects uint8 images, got {images.dtype}")
        if self.input_dtype == "float":
            images = images.float() / 255.0
        with torch.no_grad():
            return self.run_logits(images.to(self.device)).float().cpu()

    def probabilities(self, images: torch.Tensor, flip: bool | None = None) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> class probabilities (B, num_classes).

        Args:
            images: A batch of equally sized images.
            flip: Override ``self.flip`` (average with the mirror image).
        """
        probs = self.logits(images).softmax(dim=1)
        if self.flip if flip is None else flip:
            probs = (probs + self.logits(images.flip(-1)).softmax(dim=1)) / 2
        return probs


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Silences the tracer's warnings (one per Python int read from a tensor's shape) and
    torch's deprecation notices of ``torch.jit`` (see docs/deploy.md) for the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning
        )
        yield


@contextlib.contextmanager
def _reading(file: Path, what: str) -> Iterator[None]:
    """Turns a loader's failure on ``file`` (a traceback from protobuf, torch.jit, json)
    into one ValueError naming the file and what it should have been."""
    try:
        yield
    except (ImportError, FileNotFoundError):
        raise
    except Exception as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{file} is not {what} ({detail})") from err


def optional_module(name: str) -> Any:
    """``onnx`` or ``onnxruntime``, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"ONNX models need {name}: pip install 'bcnn[export]'") from err


def _from_run(path: Path, device: torch.device) -> Predictor:
    trained = load_trained(path, device=device)
    return Predictor(
        classes=trained.classes,
        transform=build_transforms(trained.config.dataset.get("transform") or None, False),
        flip=bool(trained.config.trainer.test_flip),
        kind="checkpoint",
        run_logits=trained.model,
        device=device,
    )


def read_metadata(path: Path) -> dict[str, Any]:
    """The export metadata of an export folder or an exported model file.

    Raises:
        ValueError: the file is not a model bcnn-export wrote (naming it).
    """
    if path.is_dir():
        with _reading(path / METADATA, "the metadata bcnn-export writes"):
            return json.loads((path / METADATA).read_text())
    if path.suffix == ".onnx":
        onnx = optional_module("onnx")
        with _reading(path, "an ONNX model"):
            props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        if ONNX_METADATA_KEY not in props:
            raise ValueError(f"{path}: an ONNX model without bcnn metadata (not from bcnn-export)")
        return json.loads(props[ONNX_METADATA_KEY])
    with _reading(path, "a TorchScript model bcnn-export wrote"), zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(f"extra/{METADATA}")]
        data = zf.read(names[0]) if names else b""
        if data:
            return json.loads(data)
    raise ValueError(f"{path}: a TorchScript model without bcnn metadata (not from bcnn-export)")


def from_export(meta: Mapping[str, Any], file: Path, device: torch.device) -> Predictor:
    """A :class:`Predictor` for the exported ``file`` described by ``meta``.

    Raises:
        ValueError: the file cannot be loaded as its format (naming it).
    """
    fmt = meta["format"]
    if fmt == "onnx":
        ort = optional_module("onnxruntime")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        with _reading(file, "an ONNX model onnxruntime can run"):
            session = ort.InferenceSession(str(file), providers=providers)
        name = session.get_inputs()[0].name

        def run(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: images.numpy()})[0])

    elif fmt == "torchscript":
        with _reading(file, "a TorchScript model torch can load"), quiet_jit():
            run = torch.jit.load(str(file), map_location=device).eval()
    else:
        with _reading(file.parent, "a safetensors export bcnn can rebuild"):
            spec = meta["input"]["normalized_inside"]
            config = OmegaConf.load(file.parent / "config.yaml")
            _, model = rebuild_model(config, len(meta["classes"]), spec)
            load_model(model, str(file))
            run = model.eval().to(device)
    size = meta["input"].get("fixed_size")
    return Predictor(
        classes=list(meta["classes"]),
        transform=build_transforms(meta.get("transform") or None, augment=False),
        flip=bool(meta.get("test_flip", False)),
        kind=fmt,
        run_logits=run,
        input_dtype=meta["input"]["dtype"],
        fixed_size=tuple(size) if size else None,
        device="cpu" if fmt == "onnx" else device,
    )


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """A :class:`Predictor` for a run directory, checkpoint, export folder or exported file.

    Args:
        path: A run directory, a ``.pt`` checkpoint, a folder bcnn-export wrote, or its
            ``.onnx`` / TorchScript file (both carry their metadata).
        device: ``cpu``, ``cuda[:N]`` or ``auto``; ONNX models run on the CPU unless
            onnxruntime has its CUDA provider.

    Raises:
        FileNotFoundError: nothing usable at ``path``.
        ValueError: a file that is neither a bcnn checkpoint nor a bcnn export (naming it).
    """
    path = Path(path).expanduser()
    dev = resolve_device(device)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such model. Pass a run directory (outputs/<date>/<time>), a .pt "
            "checkpoint, a folder written by bcnn-export, or its model.onnx / TorchScript file."
        )
    if path.is_dir() and (path / METADATA).is_file():
        meta = read_metadata(path)
        return from_export(meta, path / meta["file"], dev)
    if path.suffix == ".safetensors":
        if not (path.parent / METADATA).is_file():
            raise FileNotFoundError(
                f"{path}: a safetensors export needs {METADATA} and config.yaml beside it; "
                "pass the folder bcnn-export wrote"
            )
        return from_export(read_metadata(path.parent), path, dev)
    exported = path.suffix == ".onnx"
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:  # TorchScript: code/ and constants.pkl
            exported = any(
                n.endswith((f"extra/{METADATA}", "/constants.pkl")) for n in zf.namelist()
            )
    return from_export(read_metadata(path), path, dev) if exported else _from_run(path, dev)
