"""Feature cache of the linear stage: descriptors of a frozen model, computed once.

:func:`stage_inputs` plans what a stage reads: live images through the model or, when
only the classifier trains after a frozen backbone (``trainer.cache_features``), cached
descriptors through the classifier alone (:class:`ViewAverage`). :func:`build_cache`
stores each image's descriptor (and its mirror image's, with flips) in a memory-mapped
``.npy`` array ``(images, views, D)``, in a folder named by a hash of all that determines
them (weights, dataset config, split, images, views, dtype), so a second run reuses it.
Writing is safe against a full disk (space reserved up front with ``posix_fallocate``,
rows written with ``pwrite``: an ``OSError`` naming the sizes, never a SIGBUS) and
against other runs (a partial folder of its own, renamed into place under a per-key
lock: a second run with the same key waits, then reuses).
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from bcnn.engine import distributed as D
from bcnn.engine.loops import autocast
from bcnn.errors import ConfigError
from bcnn.models import BilinearModel

log = logging.getLogger(__name__)

DTYPES = {"float32": np.float32, "float16": np.float16}


def cache_key(model: nn.Module, identity: Mapping[str, Any]) -> str:
    """Hash of the weights that produce descriptors and of ``identity``.

    The classifier is left out: it is what trains on the cache.
    """
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        if name.startswith("classifier."):
            continue
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # reshape(-1): 0-dim buffers (BatchNorm's num_batches_tracked) cannot be viewed
        # as bytes directly.
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(data.numpy().tobytes())
    return h.hexdigest()[:24]


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: the unit that keeps the number readable."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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
    """The ``features.npy`` array ``(N, V, D)`` of a cache being written, by ordinary file I/O.

    The file's blocks are reserved up front (``posix_fallocate``): a full disk is an
    ``OSError`` at creation, never a SIGBUS in the middle of a memory-mapped write.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any) -> None:
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.row_bytes = shape[1] * shape[2] * self.dtype.itemsize
        with path.open("rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        self.fd = os.open(path, os.O_WRONLY)

    @classmethod
    def create(cls, path: Path, shape: tuple[int, int, int], dtype: Any) -> None:
        """Writes the header and reserves the data's space; the file then has its full size."""
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": shape,
        }
        with path.open("wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            size = f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize
            f.flush()
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, size)
            else:  # pragma: no cover - macOS, Windows: a sparse file
                f.truncate(size)

    def write(self, rows: list[int], values: np.ndarray) -> None:
        """Writes ``values[i]`` into row ``rows[i]``; runs of consecutive rows in one call."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            data = memoryview(values[start:end].tobytes())
            position = self.offset + rows[start] * self.row_bytes
            while data:
                written = os.pwrite(self.fd, data, position)
                data, position = data[written:], position + written
            start = end

    def close(self) -> None:
        """Flushes the rows to disk and closes the file."""
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


@contextlib.contextmanager
def _cache_lock(folder: Path, key: str, env: D.DistEnv) -> Iterator[None]:
    """Serializes the runs that build or read one cache key (rank 0 holds the lock)."""
    if not env.is_main:
        yield
        return
    lock = FileLock(folder / f".{key}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Another run is writing the feature cache %s: waiting for it", folder / key)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _readable(final: Path) -> bool:
    """A finished cache whose arrays open (a truncated file fails here, not with SIGBUS)."""
    if not (final / "meta.json").is_file():
        return False
    try:
        np.load(final / "features.npy", mmap_mode="r")
        np.load(final / "labels.npy")
    except (OSError, ValueError) as err:
        log.warning("Feature cache %s is unreadable (%s): computing it again", final, err)
        return False
    return True


class CachedViews(Dataset):
    """Items of a feature cache: in training one random view (*shape) (the image or its
    mirror, as random flipping would give), in evaluation all views (V, *shape).

    Args:
        features: (N, V, D) descriptors (D = prod(shape)).
        labels: (N,) labels.
        train: Training items (one view) or evaluation items (all views).
        shape: Per-sample descriptor shape, (D,) or (d1, d2).
    """

    def __init__(
        self, features: np.ndarray, labels: np.ndarray, train: bool, shape: tuple[int, ...]
    ) -> None:
        self.features, self.labels, self.train, self.shape = features, labels, train, shape

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        views = torch.tensor(self.features[index], dtype=torch.float32)
        if self.train:
            return views[int(torch.randint(len(views), ()))].view(self.shape), int(
                self.labels[index]
            )
        return views.view(len(views), *self.shape), int(self.labels[index])


class ViewAverage(nn.Module):
    """The classifier on cached descriptors.

    In training mode it maps one view (B, *shape) to logits; in eval mode all views
    (B, V, *shape) to the log of their averaged softmax (flip-averaged test scores), or to
    their averaged scores for a classifier whose ``average_views`` is ``"scores"`` (SVMs).
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.average = getattr(classifier, "average_views", "softmax")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, *shape) -> (B, C) logits (training), (B, V, *shape) -> (B, C) (eval)."""
        if self.training:
            return self.classifier(z)
        scores = self.classifier(z.flatten(0, 1)).float()
        if self.average == "scores":
            return scores.view(*z.shape[:2], -1).mean(1)
        return scores.softmax(-1).view(*z.shape[:2], -1).mean(1).log()


@torch.no_grad()
def build_cache(
    model: BilinearModel,
    dataset: Dataset,
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
        model: The model (unwrapped); only its ``features`` are used.
        dataset: The split, built with its deterministic (evaluation) transform.
        folder: Parent folder of the caches.
        identity: What besides the weights determines the descriptors (hashed).
        views: 1, or 2 to add the mirror image of every image.
        dtype: ``float32`` or ``float16`` storage.
        batch_size: Images per forward pass.
        device: Where the model lives.
        precision: Autocast setting for the backbone.
        num_workers: DataLoader workers.
        env: The distributed environment: each process computes its share of images.
        progress: Show a progress bar over the batches (this process's share).

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
        ready = D.broadcast_object(_readable(final) if env.is_main else None)
        if ready:
            log.info("Reusing the feature cache %s", final)
        else:
            job = _Job(model, dataset, folder, key, identity, views, dtype, batch_size, device,
                       precision, num_workers, env, progress)  # fmt: skip
            _write(job)
    features = np.load(final / "features.npy", mmap_mode="r")
    return features, np.load(final / "labels.npy")


@dataclass(frozen=True)
class _Job:
    """One cache to write: the arguments of ``build_cache`` and the key they hash to."""

    model: BilinearModel
    dataset: Dataset
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
    def final(self) -> Path:
        """Where the finished cache lives."""
        return self.folder / self.key

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
            _publish(job, tmp, labels)
        D.barrier()
    except OSError as err:
        if job.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if _full_disk_errors(err):
            raise _disk_full(job.folder, job.size) from None
        raise
    except BaseException:
        if job.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _reserve(job: _Job, tmp: Path) -> None:
    """Rank 0 clears killed runs' leftovers and creates ``tmp`` with the array's full size.

    Raises:
        OSError: On every process when rank 0 could not (a full disk names the fixes).
    """
    error: tuple[int | None, str] | None = None
    if job.env.is_main:
        n, views, dim = job.shape
        log.info(
            "Caching %d x %d descriptors of dimension %d (%s): %s in %s",
            n, views, dim, job.dtype, human_bytes(job.size), job.final,
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
    """Writes this process's share of descriptors into ``store``, then closes it.

    Returns:
        (N,) labels of every image, summed over the processes.
    """
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


def _publish(job: _Job, tmp: Path, labels: np.ndarray) -> None:
    """Saves the labels and metadata into ``tmp`` and renames it to the final folder."""
    np.save(tmp / "labels.npy", labels)
    meta = {**job.identity, "views": job.views}
    (tmp / "meta.json").write_text(json.dumps(meta, default=str))
    shutil.rmtree(job.final, ignore_errors=True)
    tmp.rename(job.final)


@dataclass
class StageInputs:
    """What a stage trains and evaluates: live images through the model, or cached
    descriptors through the classifier alone (``net`` is then a :class:`ViewAverage`)."""

    net: nn.Module
    train: Dataset
    val: Dataset | None
    test: Dataset
    eval_batch: int
    workers: int
    test_flip: bool
    cache_folder: Path | None = None  # a cache inside the run directory: removed after use


def cacheable(model: nn.Module, mode: str, mixes: bool) -> bool:
    """Whether a stage on ``model`` (backbone frozen) may train on cached descriptors: only
    the classifier trains after the backbone, and the stage mixes no images.

    Raises:
        ConfigError: ``trainer.cache_features=true`` where the cache cannot serve.
    """
    if mode == "false":
        return False
    extra = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not n.startswith(("backbone.", "classifier."))
    ]
    why = []
    if extra:
        why.append(f"trainable layers besides the classifier after the backbone {extra}")
    if mixes:
        why.append("a stage that mixes images (mixup_alpha, cutmix_alpha)")
    if mode == "true" and why:
        raise ConfigError(
            "trainer.cache_features", f"true cannot serve {'; '.join(why)}: use auto or false"
        )
    return not why


def stage_inputs(
    model: BilinearModel,
    splits: Mapping[str, tuple[str, Dataset]],
    train_view: Callable[[], Dataset],
    cfg: DictConfig,
    run_dir: Path,
    env: D.DistEnv,
    device: torch.device,
    *,
    stage: str,
    batch_size: int,
    progress: bool,
) -> StageInputs:
    """What a stage reads: the images, or the feature cache of each split where
    :func:`cacheable` allows (a stage that does not fine-tune the backbone).

    Args:
        model: The model, its backbone frozen unless the stage fine-tunes it.
        splits: Role (``train``, ``val``, ``test``) -> (split name, dataset).
        train_view: Builds the training split with the evaluation transform (the cache
            stores the centre view of each training image, and its mirror image).
        cfg: The run's config (``trainer.*`` cache settings, ``dataset`` for the key).
        run_dir: Where a cache without ``trainer.cache_dir`` lives (removed after use).
        env: The distributed environment.
        device: Where the model lives.
        stage: ``linear`` or ``finetune`` (never cached).
        batch_size: The evaluation batch (also the batch that builds the cache).
        progress: Show progress bars.
    """
    trainer, node = cfg.trainer, cfg.trainer[stage]
    mode, mixes = str(trainer.cache_features).lower(), bool(node.mixup_alpha or node.cutmix_alpha)
    if stage == "finetune" or not cacheable(model, mode, mixes):
        sets = {role: ds for role, (_, ds) in splits.items()}
        return StageInputs(
            model, sets["train"], sets.get("val"), sets["test"], batch_size, trainer.num_workers,
            trainer.test_flip,
        )  # fmt: skip
    folder = Path(trainer.cache_dir) if trainer.cache_dir else run_dir / "feature_cache"
    recipe = cfg.dataset.get("transform")
    flips = {"train": bool(recipe and recipe.get("hflip", True)), "test": trainer.test_flip}
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    cache = {}
    for role, (split, ds) in splits.items():
        if role == "val" and len(ds) == 0:
            continue
        ds = train_view() if role == "train" else ds
        identity = {"dataset": dataset, "split": split, "precision": str(trainer.precision)}
        # A limited run (trainer.limit_*_batches, debug=smoke) reads only the first
        # batches: cache only those images.
        limit, size = trainer.limit_eval_batches, batch_size
        if role == "train":
            limit, size = trainer.limit_train_batches, node.batch_size
        if limit is not None and limit * size < len(ds):
            ds = Subset(ds, range(limit * size))
            identity["images"] = len(ds)
        feats, labels = build_cache(
            model, ds, folder, identity, views=2 if flips.get(role) else 1,
            dtype=trainer.cache_dtype, batch_size=batch_size, device=device,
            precision=trainer.precision, num_workers=trainer.num_workers, env=env,
            progress=progress,
        )  # fmt: skip
        shape = model.descriptor_shape.dims
        cache[role] = CachedViews(feats, labels, train=role == "train", shape=shape)
    # Memory maps are read in-process; the cached views already hold the flips.
    return StageInputs(
        ViewAverage(model.classifier), cache["train"], cache.get("val"), cache["test"],
        batch_size, workers=0, test_flip=False, cache_folder=None if trainer.cache_dir else folder,
    )  # fmt: skip
