"""Atomic checkpoints and the random-number-generator state they carry."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Captures the Python, NumPy and torch (CPU and CUDA) generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what ``rng_state`` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: Any, path: str | Path) -> None:
    """Saves ``obj`` with ``torch.save`` so ``path`` is never left half-written.

    Writes a temporary file in the same directory, flushes it to disk, then renames it
    over ``path`` (an atomic replace on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_checkpoint(path: str | Path) -> Path:
    """Turns ``trainer.resume`` (a run directory or a checkpoint file) into a file path.

    Raises:
        FileNotFoundError: naming what was looked for.
    """
    path = Path(path).expanduser()
    candidate = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if not candidate.is_file():
        raise FileNotFoundError(
            f"trainer.resume={path}: no checkpoint at {candidate}. Pass a run directory "
            "containing checkpoints/last.pt or the path of a .pt checkpoint."
        )
    return candidate


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint written by the trainer onto the CPU."""
    # Our checkpoints hold numpy RNG state and plain containers: not weights-only safe,
    # and they are files this program wrote itself.
    return torch.load(path, map_location="cpu", weights_only=False)
