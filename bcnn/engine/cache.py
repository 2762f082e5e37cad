"""Cached linear stage: descriptors of a frozen model computed once, then reused.

With the backbone frozen, every epoch of the linear stage would recompute the same
descriptors. Instead they are computed once per image, and once more for its mirror
image when flips are on, and stored as a memory-mapped ``.npy`` array
``(images, views, D)`` (matrix descriptors are stored flattened). The classifier then
trains from the array. The cache lives in a
folder named by a hash of everything that determines the descriptors (the weights, the
dataset config, the split, the views and the storage dtype), so a second run with the
same setting reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from bcnn.engine import distributed as D
from bcnn.engine.loops import autocast
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


def check_disk(folder: Path, needed: int) -> None:
    """Raises before writing when ``folder``'s disk cannot hold ``needed`` bytes.

    Raises:
        OSError: naming the folder, the size needed and the size free, and the fixes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    # Keep a margin: the rest of the run (checkpoints, logs) needs room too.
    if needed * 1.05 + (256 << 20) > free:
        raise OSError(
            f"The feature cache needs {needed / 2**30:.2f} GiB but {folder} has "
            f"{free / 2**30:.2f} GiB free. Point trainer.cache_dir to a larger disk, set "
            "trainer.cache_dtype=float16 (halves it), or trainer.cache_features=false."
        )


class CachedViews(Dataset):
    """Items of a feature cache.

    In training, each item is one randomly chosen view (*shape) (the image or its mirror,
    as random flipping would give); in evaluation, all views (V, *shape).

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
    if not (final / "meta.json").exists():
        model.eval()
        n = len(dataset)
        dim = model.descriptor_shape.numel
        size = n * views * dim * np.dtype(DTYPES[dtype]).itemsize
        tmp = folder / f".{key}.partial"
        if env.is_main:
            log.info(
                "Caching %d x %d descriptors of dimension %d (%s): %.2f GiB in %s",
                n, views, dim, dtype, size / 2**30, final,
            )  # fmt: skip
            check_disk(folder, size)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            np.lib.format.open_memmap(
                tmp / "features.npy", mode="w+", dtype=DTYPES[dtype], shape=(n, views, dim)
            ).flush()
        D.barrier()
        store = np.load(tmp / "features.npy", mmap_mode="r+")
        labels = np.zeros(n, dtype=np.int64)
        rows = list(range(env.rank, n, env.world_size))
        loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, num_workers=num_workers)
        done = 0
        desc = f"caching {identity.get('split', '')} descriptors"
        for images, targets in tqdm(loader, desc=desc, leave=False, disable=not progress):
            images = images.to(device, non_blocking=True)
            idx = rows[done : done + len(targets)]
            with autocast(device, precision):
                feats = [model.features(images)]
                if views == 2:
                    feats.append(model.features(images.flip(-1)))
            stacked = torch.stack(feats, 1).flatten(2).float().cpu().numpy()
            store[idx] = stacked.astype(DTYPES[dtype])
            labels[idx] = targets.numpy()
            done += len(targets)
        store.flush()
        del store
        labels = D.all_reduce_sum(torch.from_numpy(labels)).numpy()
        D.barrier()
        if env.is_main:
            np.save(tmp / "labels.npy", labels)
            (tmp / "meta.json").write_text(json.dumps({**identity, "views": views}, default=str))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        D.barrier()
    else:
        log.info("Reusing the feature cache %s", final)
    features = np.load(final / "features.npy", mmap_mode="r")
    return features, np.load(final / "labels.npy")
