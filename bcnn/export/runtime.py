"""Class probabilities from any trained model: a run, a checkpoint or an exported model.

``load_predictor(path)`` accepts

* a run directory or a ``.pt`` training checkpoint (``bcnn.engine.runs.load_trained``);
* an export folder written by ``bcnn-export`` (it holds ``bcnn_export.json``);
* an exported file on its own: ``model.onnx`` (onnxruntime) or a TorchScript file; both
  carry their metadata (classes, input convention, transform) inside.

and returns a :class:`Predictor`: the class names, the evaluation transform of the
training run (PIL image -> uint8 (3, H, W)) and ``probabilities(images)``, flip-averaged
when the run evaluated with flips (``trainer.test_flip``).
"""

from __future__ import annotations

import contextlib
import json
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bcnn.data.transforms import build_transforms
from bcnn.engine.placement import resolve_device

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
        source: The file the weights came from.
        input_dtype: What the model takes: ``uint8`` (0-255) or ``float`` ([0, 1]).
        fixed_size: (H, W) the model only runs at, or None (any size).
        metadata: The export metadata (empty for a training checkpoint).
    """

    classes: list[str]
    transform: Callable[[Any], torch.Tensor]
    flip: bool
    kind: str
    source: Path
    run_logits: Callable[[torch.Tensor], torch.Tensor]
    input_dtype: str = "uint8"
    fixed_size: tuple[int, int] | None = None
    metadata: Mapping[str, Any] | None = None

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> float32 logits (B, num_classes) on the CPU."""
        if images.dtype != torch.uint8:
            raise ValueError(f"Predictor.logits expects uint8 images, got {images.dtype}")
        if self.input_dtype == "float":
            images = images.float() / 255.0
        with torch.no_grad():
            return self.run_logits(images).float().cpu()

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


def _on(device: torch.device, module: Callable[[torch.Tensor], torch.Tensor]):
    def run(images: torch.Tensor) -> torch.Tensor:
        return module(images.to(device))

    return run


def _transform(recipe: Mapping[str, Any] | None) -> Callable[[Any], torch.Tensor]:
    return build_transforms(dict(recipe) if recipe else None, augment=False)


def _recipe(config: DictConfig) -> dict[str, Any] | None:
    recipe = config.dataset.get("transform")
    return OmegaConf.to_container(recipe) if recipe else None  # type: ignore[return-value]


def _from_run(path: Path, device: torch.device) -> Predictor:
    from bcnn.engine.runs import load_trained

    trained = load_trained(path, device=device)
    return Predictor(
        classes=trained.classes,
        transform=_transform(_recipe(trained.config)),
        flip=bool(trained.config.trainer.test_flip),
        kind="checkpoint",
        source=trained.checkpoint,
        run_logits=_on(device, trained.model),
        input_dtype="uint8",
    )


def read_metadata(path: Path) -> dict[str, Any]:
    """The export metadata of an export folder or an exported model file.

    Raises:
        ValueError: the file carries no bcnn export metadata.
    """
    if path.is_dir():
        return json.loads((path / METADATA).read_text())
    if path.suffix == ".onnx":
        onnx = onnx_module()
        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        if ONNX_METADATA_KEY not in props:
            raise ValueError(f"{path}: an ONNX model without bcnn metadata (not from bcnn-export)")
        return json.loads(props[ONNX_METADATA_KEY])
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(f"extra/{METADATA}")]
        if not names:
            raise ValueError(f"{path}: a TorchScript file without bcnn metadata")
        return json.loads(zf.read(names[0]))


def onnx_module() -> Any:
    """The ``onnx`` package, or an ImportError naming the extra to install."""
    try:
        import onnx
    except ImportError as err:
        raise ImportError("ONNX models need the onnx package: pip install 'bcnn[export]'") from err
    return onnx


def onnxruntime_module() -> Any:
    """The ``onnxruntime`` package, or an ImportError naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "Running an ONNX model needs onnxruntime: pip install 'bcnn[export]'"
        ) from err
    return onnxruntime


def _from_export(meta: Mapping[str, Any], file: Path, device: torch.device) -> Predictor:
    fmt = meta["format"]
    if fmt == "torchscript":
        with quiet_jit():
            module = torch.jit.load(str(file), map_location=device).eval()
        run = _on(device, module)
    elif fmt == "onnx":
        ort = onnxruntime_module()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(str(file), providers=providers)
        name = session.get_inputs()[0].name

        def run(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: images.numpy()})[0])

    elif fmt == "safetensors":
        run = _on(device, load_safetensors_model(file.parent, meta).to(device))
    else:
        raise ValueError(f"{file}: unknown export format {fmt!r}")
    size = meta["input"].get("fixed_size")
    return Predictor(
        classes=list(meta["classes"]),
        transform=_transform(meta.get("transform")),
        flip=bool(meta.get("test_flip", False)),
        kind=fmt,
        source=file,
        run_logits=run,
        input_dtype=meta["input"]["dtype"],
        fixed_size=tuple(size) if size else None,
        metadata=meta,
    )


def load_safetensors_model(folder: Path, meta: Mapping[str, Any]) -> torch.nn.Module:
    """Rebuilds the eager model of a safetensors export (``config.yaml`` + weights).

    Args:
        folder: The export folder.
        meta: Its metadata.

    Returns:
        The ``BilinearModel`` in eval mode on the CPU.
    """
    from safetensors.torch import load_model

    from bcnn.config import schema
    from bcnn.engine.runs import without_weight_sources
    from bcnn.models import build_model
    from bcnn.models.inputs import InputSpec

    config = OmegaConf.merge(schema(), OmegaConf.load(folder / "config.yaml"))
    assert isinstance(config, DictConfig)
    with without_weight_sources(config):
        model = build_model(config, len(meta["classes"]))
    spec = meta["input"]["normalized_inside"]
    model.set_input_spec(
        InputSpec(tuple(spec["mean"]), tuple(spec["std"]), spec["color"], float(spec["scale"]))
    )
    load_model(model, str(folder / meta["file"]))
    return model.eval()


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """A :class:`Predictor` for a run directory, checkpoint, export folder or exported file.

    Args:
        path: See the module docstring.
        device: ``cpu``, ``cuda[:N]`` or ``auto``; ONNX models run on the CPU unless
            onnxruntime has its CUDA provider.

    Raises:
        FileNotFoundError: nothing usable at ``path``.
        ValueError: a file that is neither a bcnn checkpoint nor a bcnn export.
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
        return _from_export(meta, path / meta["file"], dev)
    if path.is_file() and path.suffix == ".onnx":
        return _from_export(read_metadata(path), path, dev)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            scripted = any(n.endswith(f"extra/{METADATA}") for n in zf.namelist())
        if scripted:
            return _from_export(read_metadata(path), path, dev)
    if path.is_file() and path.suffix == ".safetensors":
        beside = path.parent / METADATA
        if not beside.is_file():
            raise FileNotFoundError(
                f"{path}: a safetensors export needs {METADATA} and config.yaml beside it; "
                "pass the folder bcnn-export wrote"
            )
        return _from_export(read_metadata(path.parent), path, dev)
    return _from_run(path, dev)


__all__ = [
    "METADATA",
    "ONNX_METADATA_KEY",
    "Predictor",
    "load_predictor",
    "quiet_jit",
    "read_metadata",
]
