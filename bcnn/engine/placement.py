"""Where a command runs and writes, the same in every command: its device and its output
directory."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other name as given."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def output_dir(cfg: DictConfig, command: str, function: str) -> Path:
    """``paths.output_dir``, else Hydra's run directory.

    Raises:
        ValueError: neither is set; names ``command`` and ``function``, the ways to set one.
    """
    if cfg.paths.get("output_dir"):
        return Path(cfg.paths.output_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ValueError(
        f"paths.output_dir is not set: run through {command} (Hydra picks the directory) or "
        f"pass paths.output_dir=<folder> when calling {function} directly"
    )
