"""Cached linear stage: descriptors of a frozen model computed once, then reused.

With the backbone frozen, every epoch of the linear stage would recompute the same
descriptors. Instead they are computed once per image, and once more for its mirror
image when flips are on, and stored as a memory-mapped ``.npy`` array
``(images, views, D)``. The classifier then trains from the array. The cache lives in a
folder named by a hash of everything that determines the descriptors (the weights, the
dataset config, the split, the views and the storage dtype), so a second run with the
same setting reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from bcnn.engine import distributed as D
from bcnn.engine.loops import autocast

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
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
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

    In training, each item is one randomly chosen view (B, D) (the image or its mirror,
    as random flipping would give); in evaluation, all views (B, V, D).
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, train: bool) -> None:
        self.features, self.labels, self.train = features, labels, train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        views = self.features[index]
        if self.train:
            views = views[int(torch.randint(len(views), ()))]
        return torch.tensor(views, dtype=torch.float32), int(self.labels[index])


class ViewAverage(nn.Module):
    """Classifier over cached views: (B, D) -> logits; (B, V, D) -> log mean softmax."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, C) logits, or (B, V, D) -> (B, C) log of view-averaged softmax."""
        if z.dim() == 2:
            return self.classifier(z)
        probs = self.classifier(z.flatten(0, 1)).float().softmax(-1)
        return probs.view(*z.shape[:2], -1).mean(1).log()


@torch.no_grad()
def build_cache(
    model: nn.Module,
    dataset: Dataset,
    folder: Path,
    identity: Mapping[str, Any],
    views: int,
    dtype: str,
    batch_size: int,
    device: torch.device,
    precision: str,
    num_workers: int,
    env: D.DistEnv,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Computes (or reuses) the descriptors of ``dataset`` under ``model.features``.

    Args:
        model: A ``BilinearModel`` (unwrapped); only its ``features`` are used.
        dataset: The split, with its deterministic (evaluation) transform attached.
        folder: Parent folder of the caches.
        identity: What besides the weights determines the descriptors (hashed).
        views: 1, or 2 to add the mirror image of every image.
        dtype: ``float32`` or ``float16`` storage.
        batch_size: Images per forward pass.
        device: Where the model lives.
        precision: Autocast setting for the backbone.
        num_workers: DataLoader workers.
        env: The distributed environment: each process computes its share of images.
        prepare: Applied to each batch on the device (e.g. uint8 -> normalized float).

    Returns:
        Read-only memory maps: features (N, views, D) and labels (N,).
    """
    key = cache_key(model, {**identity, "views": views, "dtype": dtype})
    final = folder / key
    if not (final / "meta.json").exists():
        model.eval()
        n = len(dataset)
        dim = model.classifier.in_features
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
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            if prepare is not None:
                images = prepare(images)
            idx = rows[done : done + len(targets)]
            with autocast(device, precision):
                feats = [model.features(images)]
                if views == 2:
                    feats.append(model.features(images.flip(-1)))
            store[idx] = torch.stack(feats, 1).float().cpu().numpy().astype(DTYPES[dtype])
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
