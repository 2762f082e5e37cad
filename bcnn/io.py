"""Reading weights and checkpoints without running code from them.

The bottom of bcnn's layers: models read weights files and the engine reads checkpoints
through :func:`safe_load`, which allows only tensors, containers and the few NumPy types of
a random-generator state (:func:`safe_globals`), so a crafted file cannot run code.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch


def safe_globals() -> list[Any]:
    """The non-torch types a bcnn checkpoint holds, allowed under ``weights_only=True``.

    NumPy array reconstruction for the NumPy random-generator state (a uint32 array):
    data types only, no callable that could run code.
    """
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float32, np.float64)]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load`` onto the CPU with ``weights_only=True`` and only :func:`safe_globals`.

    A crafted file cannot run code; it raises (``pickle.UnpicklingError``) instead.
    """
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)
