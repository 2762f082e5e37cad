"""Feature cache of a stage with a frozen backbone: descriptors computed once, then read.

:func:`build_cache` stores the descriptors of each image (and of its mirror image) as a
memory-mapped ``(images, views, D)`` array in a folder named by a hash of all that
determines them, so a second run reuses it. Writing is safe against a full disk (space
reserved up front: an ``OSError`` naming the sizes, never a SIGBUS) and against other runs
(a partial folder of its own, renamed into place under a per-key lock).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from bcnn.engine import distributed as D
from bcnn.engine.loops import autocast
from bcnn.models import BilinearModel

log = logging.getLogger(__name__)

DTYPES = {"float32": np.float32, "float16": np.float16}
# A map-style dataset of (image, label) items with a length (torch's Dataset type has none).
Split = Any


def cache_key(model: nn.Module, identity: Mapping[str, Any]) -> str:
    """Hash of ``identity`` and of the weights before the classifier (which trains on it)."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        if name.startswith("classifier."):
            continue
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # reshape(-1): a 0-dim buffer (num_batches_tracked) cannot be viewed as bytes.
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(data.numpy().tobytes())
    return h.hexdigest()[:24]


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# Kept free beyond the cache: the rest of the run (checkpoints, logs) needs room too.
DISK_MARGIN = 256 << 20


def _disk_full(folder: Path, needed: int) -> OSError:
    free = shutil.disk_usage(folder).free
    return OSError(
        errno.ENOSPC,
        f"The feature cache needs {human_bytes(needed)} (plus {human_bytes(DISK_MARGIN)} "
        f"spare) but {folder} has {human_bytes(free)} free. Point trainer.cache_dir to a "
        "larger disk, set trainer.cache_dtype=float16 (halves it), or "
        "trainer.cache_features=false.",
    )


def _full_disk_errors(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class _Store:
    """The ``features.npy`` array ``(N, V, D)`` of a cache being written, by plain file I/O:
    its blocks are reserved up front (``posix_fallocate``), so a full disk is an ``OSError``
    at creation, never a SIGBUS in the middle of a memory-mapped write."""

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.row_bytes = shape[1] * shape[2] * self.dtype.itemsize
        with path.open("rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        self.fd = os.open(path, os.O_WRONLY)

    @staticmethod
    def create(path: Path, shape: tuple[int, int, int], dtype: Any) -> None:
        """Writes the header and reserves the space of the data."""
        descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
        with path.open("wb") as f:
            header = {"descr": descr, "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
            size = f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize
            f.flush()
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, size)
            else:  # pragma: no cover - macOS, Windows: a sparse file
                f.truncate(size)

    def write(self, rows: list[int], values: np.ndarray) -> None:
        """Writes ``values[i]`` (V, D) into row ``rows[i]``."""
        for row, value in zip(rows, values.astype(self.dtype)):
            data, position = memoryview(value.tobytes()), self.offset + row * self.row_bytes
            while data:
                written = os.pwrite(self.fd, data, position)
                data, position = data[written:], position + written

    def close(self) -> None:
        """Flushes the rows to disk and closes the file."""
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


def _cache_lock(folder: Path, key: str, env: D.DistEnv) -> contextlib.AbstractContextManager:
    """Takes the lock that serializes the runs that build or read one cache key (held by
    rank 0); the returned context releases it."""
    if not env.is_main:
        return contextlib.nullcontext()
    lock = FileLock(folder / f".{key}.lock")
    try:
        return lock.acquire(timeout=0)
    except Timeout:
        log.info("Another run is writing the feature cache %s: waiting for it", folder / key)
        return lock.acquire()


def _readable(final: Path) -> bool:
    """Whether a finished cache's arrays open (a truncated one fails here, not with SIGBUS)."""
    if not (final / "meta.json").is_file():
        return False
    try:
        np.load(final / "features.npy", mmap_mode="r")
        np.load(final / "labels.npy")
    except (OSError, ValueError) as err:
        log.warning("Feature cache %s is unreadable (%s): computing it again", final, err)
        return False
    return True


@dataclass(eq=False)
class CachedViews(Dataset):
    """Items of a feature cache: in training one random view (*shape) (the image or its
    mirror, as random flipping gives), in evaluation all views (V, *shape).

    Attributes:
        features: (N, V, D) descriptors (D = prod(shape)).
        labels: (N,) labels.
        train: Training items (one view) or evaluation items (all views).
        shape: Per-sample descriptor shape, (D,) or (d1, d2).
    """

    features: np.ndarray
    labels: np.ndarray
    train: bool
    shape: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        views = torch.tensor(self.features[index], dtype=torch.float32)
        label = int(self.labels[index])
        if self.train:
            return views[int(torch.randint(len(views), ()))].view(self.shape), label
        return views.view(len(views), *self.shape), label


class ViewAverage(nn.Module):
    """The classifier on cached descriptors: in eval mode it averages the softmax over the
    views (flip-averaged test scores), or the scores where ``average_views`` is ``"scores"``
    (SVMs)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.average = getattr(classifier, "average_views", "softmax")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, *shape) -> (B, C) logits (training); (B, V, *shape) -> (B, C) log-probabilities
        or scores (eval)."""
        if self.training:
            return self.classifier(z)
        scores = self.classifier(z.flatten(0, 1)).float()
        if self.average == "scores":
            return scores.view(*z.shape[:2], -1).mean(1)
        return scores.softmax(-1).view(*z.shape[:2], -1).mean(1).log()


@torch.no_grad()
def build_cache(
    model: BilinearModel,
    dataset: Split,
    folder: Path,
    identity: Mapping[str, Any],
    *,
    views: int,
    dtype: str,
    batch_size: int,
    device: torch.device,
    precision: str,
    num_workers: int,
    env: D.DistEnv,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Computes (or reuses) the descriptors of ``dataset`` under ``model.features``.

    Args:
        model: The model (unwrapped); only its ``features`` run.
        dataset: The split, with its deterministic (evaluation) transform.
        folder: Parent folder of the caches.
        identity: What besides the weights determines the descriptors (hashed).
        views: 1, or 2 to add the mirror image of every image.
        dtype: ``float32`` or ``float16`` storage.
        precision: Autocast setting of the backbone.
        env: The distributed environment: each process computes its share of images.
        progress: Show a progress bar over this process's batches.

    Returns:
        Read-only memory maps: features (N, views, D) and labels (N,).
    """
    key = cache_key(model, {**identity, "views": views, "dtype": dtype})
    final = folder / key
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    D.barrier()
    # One run writes a key at a time; a run that waited then finds it finished and reuses it.
    with _cache_lock(folder, key, env):
        if D.broadcast_object(_readable(final) if env.is_main else None):
            log.info("Reusing the feature cache %s", final)
        else:
            job = _Job(model, dataset, folder, key, identity, views, dtype, batch_size, device,
                       precision, num_workers, env, progress)  # fmt: skip
            _write(job)
    return np.load(final / "features.npy", mmap_mode="r"), np.load(final / "labels.npy")


@dataclass(frozen=True)
class _Job:
    """The arguments of ``build_cache`` and the key they hash to."""

    model: BilinearModel
    dataset: Split
    folder: Path
    key: str
    identity: Mapping[str, Any]
    views: int
    dtype: str
    batch_size: int
    device: torch.device
    precision: str
    num_workers: int
    env: D.DistEnv
    progress: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        """The features array's shape ``(images, views, D)``."""
        return len(self.dataset), self.views, self.model.descriptor_shape.numel

    @property
    def size(self) -> int:
        """The features array's size in bytes."""
        return int(np.prod(self.shape)) * np.dtype(DTYPES[self.dtype]).itemsize


def _write(job: _Job) -> None:
    """Computes the descriptors into a partial folder of this run, then renames it into place."""
    job.model.eval()
    # A folder of this run's own: a crashed run's leftovers never mix with it.
    tmp = job.folder / f".{job.key}.{D.broadcast_object(uuid.uuid4().hex[:8])}.partial"
    _reserve(job, tmp)
    try:
        labels = _compute(job, _Store(tmp / "features.npy", job.shape, DTYPES[job.dtype]))
        D.barrier()
        if job.env.is_main:
            np.save(tmp / "labels.npy", labels)
            meta = {**job.identity, "views": job.views}
            (tmp / "meta.json").write_text(json.dumps(meta, default=str))
            shutil.rmtree(job.folder / job.key, ignore_errors=True)
            tmp.rename(job.folder / job.key)
        D.barrier()
    except BaseException as err:
        if job.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and _full_disk_errors(err):
            raise _disk_full(job.folder, job.size) from None
        raise


def _reserve(job: _Job, tmp: Path) -> None:
    """Rank 0 clears killed runs' leftovers and creates ``tmp`` with the array's full size;
    when it cannot, every process raises its ``OSError`` (a full disk names the fixes)."""
    error: tuple[int | None, str] | None = None
    if job.env.is_main:
        log.info(
            "Caching %d x %d descriptors of dimension %d (%s): %s in %s",
            *job.shape, job.dtype, human_bytes(job.size), job.folder / job.key,
        )  # fmt: skip
        for stale in job.folder.glob(f".{job.key}.*.partial"):  # killed runs (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            if job.size * 1.05 + DISK_MARGIN > shutil.disk_usage(job.folder).free:
                raise _disk_full(job.folder, job.size)
            tmp.mkdir(parents=True)
            _Store.create(tmp / "features.npy", job.shape, DTYPES[job.dtype])
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if _full_disk_errors(err):
                err = _disk_full(job.folder, job.size)
            error = (err.errno, err.strerror or str(err))
    # Every process learns of rank 0's failure (and raises the same error).
    error = D.broadcast_object(error)
    if error is not None:
        raise OSError(*error)


def _compute(job: _Job, store: _Store) -> np.ndarray:
    """Writes this process's share of descriptors into ``store`` and closes it; returns the
    (N,) labels of every image, summed over the processes."""
    model, n = job.model, len(job.dataset)
    labels = np.zeros(n, dtype=np.int64)
    rows = list(range(job.env.rank, n, job.env.world_size))
    loader = DataLoader(
        Subset(job.dataset, rows), batch_size=job.batch_size, num_workers=job.num_workers
    )
    done = 0
    desc = f"caching {job.identity.get('split', '')} descriptors"
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not job.progress):
        images = images.to(job.device, non_blocking=True)
        idx = rows[done : done + len(targets)]
        with autocast(job.device, job.precision):
            feats = [model.features(images)]
            if job.views == 2:
                feats.append(model.features(images.flip(-1)))
        store.write(idx, torch.stack(feats, 1).flatten(2).float().cpu().numpy())
        labels[idx] = targets.numpy()
        done += len(targets)
    store.close()
    return D.all_reduce_sum(torch.from_numpy(labels)).numpy()
