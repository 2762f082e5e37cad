"""Checkpoints: written atomically with the previous one kept, read without running code.

A checkpoint is a plain dict saved by ``torch.save`` and read with ``weights_only=True``
(``bcnn.io.safe_load``), so a crafted file cannot run code. A crash at any moment leaves a
complete ``last.pt`` or ``last.prev.pt``, and :func:`load_resumable` falls back to the
previous one when the newest is missing or unreadable.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import pickle
import random
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bcnn.io import safe_load

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (corrupt, foreign or unsafe); names the file."""


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


def previous_path(path: str | Path) -> Path:
    """``last.pt`` -> ``last.prev.pt``: where the file before the current one is kept."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def remove_temporaries(folder: str | Path) -> None:
    """Deletes what interrupted writes left in ``folder`` (``.<name>.*.tmp``)."""
    for stale in Path(folder).glob(f".*{TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    # The renames themselves reach the disk only with the directory's entry.
    with contextlib.suppress(OSError):  # Windows, filesystems without directory fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomic(obj: Any, path: str | Path) -> None:
    """Saves ``obj`` with ``torch.save`` so ``path`` is never left half-written.

    Writes a temporary file in the same directory, flushes it to disk, then renames it
    over ``path``. The temporary file is removed if the write fails; on a full disk the
    ``OSError`` (ENOSPC) names the folder, the size the file needs and the space free.
    """
    _save(obj, Path(path), keep_previous=False)


def save_checkpoint(obj: Mapping[str, Any], path: str | Path) -> None:
    """Writes a checkpoint atomically and keeps the one it replaces as ``<name>.prev.pt``.

    Order: temporary file (flushed) -> current file renamed to the ``.prev`` name -> the
    temporary file renamed to ``path``. Every moment leaves at least one complete file,
    a full disk included (an ``OSError`` as for :func:`save_atomic`).
    """
    path = Path(path)
    remove_temporaries(path.parent)
    _save(dict(obj), path, keep_previous=True)


def _save(obj: Any, path: Path, keep_previous: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause: BaseException | None = err  # torch reports a failed write as a RuntimeError
        while cause is not None and getattr(cause, "errno", None) not in FULL_DISK:
            cause = cause.__context__
        if cause is None:
            raise
        from bcnn.engine.cache import human_bytes

        needed = io.BytesIO()
        torch.save(obj, needed)  # in memory this time: the size the file needs
        free = human_bytes(shutil.disk_usage(path.parent).free)
        raise OSError(
            errno.ENOSPC,
            f"The disk is full: the checkpoint {path} needs {human_bytes(needed.tell())} and "
            f"{path.parent} has {free} free. The checkpoints written before are intact: free "
            "some space, then resume the run (trainer.resume=<run directory>).",
        ) from err
    _fsync_dir(path.parent)


def link_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Makes ``dst`` the same checkpoint as ``src`` (atomically): a hard link where the
    filesystem has them (checkpoints are replaced by renames, never rewritten in place, so
    the two names never disagree), else a copy."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link{TMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def resolve_checkpoint(path: str | Path) -> Path:
    """Turns ``trainer.resume`` (a run directory: its ``checkpoints/last.pt``, or a
    checkpoint file) into a file path; the file or its ``.prev`` sibling exists.

    Raises:
        FileNotFoundError: naming what was looked for.
    """
    path = Path(path).expanduser()
    candidate = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if candidate.is_file() or previous_path(candidate).is_file():
        return candidate
    raise FileNotFoundError(
        f"trainer.resume={path}: no checkpoint at {candidate}. Pass a run directory "
        "containing checkpoints/last.pt or the path of a .pt checkpoint."
    )


def _why_unreadable(path: Path, err: BaseException) -> str:
    """Why ``safe_load`` refused ``path``: one sentence naming the file."""
    cannot = f"Cannot read the checkpoint {path}"
    # torch names a refused global, e.g. "Unsupported global: GLOBAL posix.system".
    lines = [line.strip() for line in str(err).splitlines() if "global" in line.lower()]
    if isinstance(err, pickle.UnpicklingError) and any("unsupported" in x.lower() for x in lines):
        return (
            f"{cannot}: it asks to load objects a bcnn checkpoint never holds ({lines[-1]}); "
            "refused without running it. Only load checkpoints you trust."
        )
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        return f"{cannot}: the file is empty (an interrupted write?)."
    if head != b"PK\x03\x04":
        return f"{path} is not a checkpoint (torch.save writes zip archives; this file is not one)."
    if not zipfile.is_zipfile(path):
        return f"{cannot}: the file is truncated or corrupt ({type(err).__name__}: {err})."
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if any(name.endswith("/constants.pkl") for name in names):
        return f"{path} is not a checkpoint but a TorchScript model."
    if not any(name.endswith("/data.pkl") for name in names):
        return f"{path} is not a checkpoint (a zip archive that torch.save did not write)."
    return f"{cannot}: {type(err).__name__}: {err}."


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint written by bcnn onto the CPU, without running code from it.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is corrupt, truncated, not a bcnn checkpoint, or asks to
            load anything but tensors, containers and NumPy's generator state; the message
            names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = safe_load(path)
    except Exception as err:
        raise CheckpointError(_why_unreadable(path, err)) from None
    if not isinstance(obj, dict) or "model" not in obj:
        kind = type(obj).__name__
        raise CheckpointError(
            f"{path} is not a bcnn checkpoint (a {kind} without the 'model' entry bcnn writes)."
        )
    return obj


RESUME_KEYS = ("model", "config", "stage_index", "next_epoch", "history", "rng")


def load_resumable(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(file, checkpoint)``: the newest usable one of ``path`` and its ``.prev`` sibling
    (a missing, corrupt or incomplete ``path`` is logged).

    Raises:
        CheckpointError: neither file can be used; names both and why.
    """
    path = Path(path)
    remove_temporaries(path.parent)
    problems = []
    for candidate in (path, previous_path(path)):
        try:
            ckpt = load_checkpoint(candidate)
        except (FileNotFoundError, CheckpointError) as err:
            problems.append(str(err))
            continue
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            problems.append(f"{candidate} lacks {missing}: not a training checkpoint")
            continue
        if problems:
            log.warning("%s; resuming from the previous checkpoint %s", problems[0], candidate)
        return candidate, ckpt
    raise CheckpointError("No usable checkpoint to resume from: " + " | ".join(problems))
