"""A trained model back from its run directory or checkpoint, ready for inference.

Every command that uses a trained model (evaluation, prediction, export, visualization)
starts here, so they all read a run the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bcnn.config import schema
from bcnn.engine.checkpoint import load_checkpoint
from bcnn.models import BilinearModel, build_model
from bcnn.models.inputs import InputSpec


@dataclass
class TrainedModel:
    """A model with what it was trained on.

    Attributes:
        model: The model in eval mode (uint8 or [0, 1] images in, logits out).
        config: The run's resolved config (typed like a composed one).
        classes: Class names; ``classes[i]`` names logit i.
        checkpoint: The file the weights came from.
        run_dir: The run directory (the checkpoint's grandparent).
    """

    model: BilinearModel
    config: DictConfig
    classes: list[str]
    checkpoint: Path
    run_dir: Path


def resolve_trained(path: str | Path) -> Path:
    """A run directory (its ``checkpoints/best.pt``, else ``last.pt``) or a ``.pt`` file.

    Raises:
        FileNotFoundError: naming what was looked for.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    for name in ("best.pt", "last.pt"):
        candidate = path / "checkpoints" / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{path}: neither a checkpoint file nor a run directory with checkpoints/best.pt or "
        "checkpoints/last.pt. Pass the folder a training run wrote (outputs/<date>/<time>) "
        "or one of its .pt files."
    )


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuilds a trained model from a run directory or checkpoint file.

    The weights of a run directory are those of its selected epoch (``best.pt``; a run
    without a validation split selects its last epoch, so ``best.pt`` holds it as well).

    Args:
        path: Run directory or ``.pt`` checkpoint written by ``bcnn-train``.
        device: Where to put the model.

    Returns:
        The model in eval mode, its config and class names.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the checkpoint does not hold a bcnn model.
    """
    file = resolve_trained(path)
    ckpt: dict[str, Any] = load_checkpoint(file)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{file} is not a bcnn training checkpoint (no model and config)")
    config = OmegaConf.merge(schema(), ckpt["config"])
    assert isinstance(config, DictConfig)
    weights = ckpt["model"]
    classes = ckpt.get("classes")
    if classes is None:  # checkpoints written before class names were stored
        num_classes = next(v.shape[0] for k, v in weights.items() if k.endswith("bias"))
        classes = [str(i) for i in range(num_classes)]
    # The weights are about to be replaced: no download, no weights file needed. The input
    # convention a weights file brought (MatConvNet's) is restored from the checkpoint.
    with without_weight_sources(config):
        model = build_model(config, len(classes))
    if ckpt.get("input_spec"):
        spec = ckpt["input_spec"]
        model.set_input_spec(
            InputSpec(**{k: tuple(v) if k in ("mean", "std") else v for k, v in spec.items()})
        )
    model.load_state_dict(weights)
    model.to(device).eval()
    return TrainedModel(model, config, list(classes), file, file.parent.parent)


@contextlib.contextmanager
def without_weight_sources(config: DictConfig) -> Iterator[None]:
    """Sets every ``pretrained`` of the backbone config to false, and every ``weights`` whose
    file is gone to null, for the block."""
    saved: list[tuple[DictConfig, str, Any]] = []

    def visit(node: Any) -> None:
        if isinstance(node, DictConfig):
            for key in list(node.keys()):
                if key == "pretrained" or (
                    key == "weights" and node[key] and not Path(node[key]).expanduser().is_file()
                ):
                    saved.append((node, str(key), node[key]))
                    node[key] = False if key == "pretrained" else None
                else:
                    visit(node[key])

    visit(config.backbone)
    try:
        yield
    finally:
        for node, key, value in saved:
            node[key] = value
