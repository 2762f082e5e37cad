"""One-vs-all linear SVMs trained on cached descriptors, streamed from a memory map.

The papers' "no fine-tuning" rows: for each class k, with y_ik = +1 for class k and -1
otherwise, over every view x_i (an image and its mirror image) of every training image,

    min_{w_k, b_k}  0.5 (||w_k||^2 + b_k^2) + C sum_i loss(y_ik (w_k . x_i + b_k))

with loss(m) = max(0, 1 - m) (``"hinge"``) or its square (``"squared_hinge"``); the bias is
LIBLINEAR's and VLFeat's, a regularized constant feature 1. Solved by dual coordinate
descent (Hsieh et al., ICML 2008) for all classes at once over blocks of images, stopping
on every class's relative duality gap as ``vl_svmtrain`` (the authors call it with
``'epsilon', 1e-3``). Memory: W, the alphas (N V K float64) and two blocks, never a second
copy of the cache. Algorithm, cost and convergence: docs/ops.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

LOSSES = ("hinge", "squared_hinge")


class RowArray(Protocol):
    """What the SVM needs from a feature cache: numpy-style shape, dtype and row reads."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def __getitem__(self, index: Any) -> Any: ...


def _check_features(features: RowArray, name: str) -> tuple[int, int, int]:
    """(N, V, D) of a cache, (N, 1, D) for a 2-D one."""
    shape = tuple(int(n) for n in features.shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"{name}: features must be (N, V, D) or (N, D), got shape {shape}")
    if not np.issubdtype(np.dtype(features.dtype), np.floating):
        raise TypeError(f"{name}: features must be floating point, got {features.dtype}")
    return (shape[0], 1, shape[1]) if len(shape) == 2 else (shape[0], shape[1], shape[2])


def _read(features: RowArray, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` (sorted) of the cache as a (b, V, D) host array (one copy of b rows)."""
    block = np.asarray(features[index])
    return np.ascontiguousarray(block[:, None] if block.ndim == 2 else block)


def _blocks(
    features: RowArray, order: np.ndarray, batch_rows: int, device: torch.device, dtype
) -> Iterator[tuple[np.ndarray, Tensor]]:
    """Yields (sorted image indices, (b V, D) rows on ``device`` in ``dtype``), reading the
    next block in a background thread."""
    chunks = [np.sort(order[s : s + batch_rows]) for s in range(0, len(order), batch_rows)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read, features, chunks[0])
        for i, idx in enumerate(chunks):
            block = torch.from_numpy(pending.result())
            if i + 1 < len(chunks):
                pending = pool.submit(_read, features, chunks[i + 1])
            # Cast after the copy: float16 caches cross to the device at half the bytes.
            yield idx, block.to(device).to(dtype).reshape(-1, block.shape[-1])
            del block


def _check_labels(labels: Any, N: int, num_classes: int, name: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (N,):
        raise ValueError(f"{name}: labels must have shape ({N},) to match features, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name}: labels must be integers, got {y.dtype}")
    if num_classes < 2:
        raise ValueError(f"{name}: num_classes must be >= 2, got {num_classes}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"{name}: labels must lie in [0, num_classes={num_classes}), got range "
            f"[{y.min()}, {y.max()}]"
        )
    return y.astype(np.int64)


def _cd_block(
    fT: np.ndarray,
    G: np.ndarray,
    A: np.ndarray,
    Y: np.ndarray,
    upper: float,
    diag: float,
    sweeps: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Dual coordinate descent over the rows of one block, all classes at once.

    For row j and every class: g = y f_j - 1 + D_jj alpha_j, alpha_j <- clip(alpha_j -
    g / Qbar_jj, 0, U) (the exact minimizer along that coordinate), then the block's
    decision values ``fT`` (K, m) move by G[j] (m, m) times the change. ``A`` (m, K), the
    dual variables, and ``fT`` are updated in place; ``Y`` (m, K) holds the +-1 targets,
    ``upper`` the box bound U (inf for the squared hinge), ``diag`` D_jj (0 for the hinge).

    Returns:
        ``(m, K)`` change of y * alpha per row: W moves by its transpose times the rows.
    """
    m = G.shape[0]
    qd = np.diag(G) + diag
    delta = np.zeros_like(A)
    for _ in range(sweeps):
        for j in rng.permutation(m):
            if qd[j] <= 0.0:  # an all-zero row without bias: nothing to learn from it
                continue
            a, y = A[j], Y[j]
            g = y * fT[:, j] - 1.0
            if diag:
                g += diag * a
            a_new = np.clip(a - g / qd[j], 0.0, upper)
            d = (a_new - a) * y
            moved = np.flatnonzero(d)
            if moved.size == 0:
                continue
            A[j] = a_new
            delta[j] += d
            # One-vs-all: at most rows, only a few classes move; update just those.
            if moved.size * 4 < d.size:
                fT[moved] += d[moved, None] * G[j][None, :]
            else:
                fT += d[:, None] * G[j][None, :]
    return delta


def _loss(fT: np.ndarray, Y: np.ndarray, squared: bool) -> np.ndarray:
    """Per-class sum of the loss of decision values ``(K, m)`` against targets ``(m, K)``."""
    h = np.maximum(1.0 - Y.T * fT, 0.0)
    return (h * h if squared else h).sum(1)


def _relative_gap(primal: np.ndarray, dual: np.ndarray) -> float:
    return float(((primal - dual) / np.maximum(np.abs(primal), 1e-12)).max())


def train_linear_svm(
    features: RowArray,
    labels: Any,
    num_classes: int,
    C: float = 1.0,
    loss: str = "hinge",
    bias: bool = True,
    tol: float = 1e-3,
    max_epochs: int = 200,
    inner_sweeps: int = 3,
    batch_rows: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Trains K one-vs-all linear SVMs on every view of every image of a feature cache.

    Once every class's relative duality gap (P_k - D_k) / P_k estimated during an epoch is
    at most ``tol``, one more read computes the exact gap, and training stops if it is too.

    Args:
        features: ``(N, V, D)`` (or ``(N, D)``) array-like with numpy indexing (a feature
            cache's float16/float32 memory map): every view is a sample with its label.
        labels: ``(N,)`` integer class indices in ``[0, num_classes)``.
        num_classes: K.
        C: Weight of the loss.
        loss: ``"hinge"`` (``vl_svmtrain``'s) or ``"squared_hinge"`` (``LinearSVC``'s).
        bias: Learn an intercept.
        tol: Target relative duality gap, per class.
        max_epochs: Maximum number of coordinate-descent passes over the cache.
        inner_sweeps: Passes over each block while it is in memory (more work per read).
        batch_rows: Images (first-axis rows of ``features``) per block.
        device: Where W and the block products live (``"cuda"`` for real sizes).
        seed: Seed of the row orders (the result is deterministic given the data).

    Returns:
        ``W`` ``(K, D)`` and ``b`` ``(K,)``, float32 on ``device`` (decision value
        ``x @ W.T + b``), and ``info``: ``epochs``, ``converged``, ``reads`` (passes over
        the cache), ``primal`` and ``dual`` (``(K,)`` float64 objectives; primal >= optimum
        >= dual), ``gap``, ``objective`` (sum of ``primal``), ``train_accuracy`` (per
        view), ``seconds``.
    """
    N, V, D = _check_features(features, "train_linear_svm")
    y = _check_labels(labels, N, num_classes, "train_linear_svm")
    if loss not in LOSSES:
        raise ValueError(f"train_linear_svm: loss must be one of {LOSSES}, got {loss!r}")
    if C <= 0 or min(batch_rows, max_epochs, inner_sweeps) < 1:
        raise ValueError(
            "train_linear_svm: C must be > 0 and batch_rows, max_epochs and inner_sweeps >= 1"
        )
    start = time.perf_counter()
    state = _DualState(features, y, (N, V, D), num_classes, C, loss, bias, batch_rows, device)
    rng = np.random.default_rng(seed)
    converged, reads, epoch = False, 0, 0
    exact: tuple[np.ndarray, int] | None = None
    for epoch in range(1, max_epochs + 1):
        stale = state.epoch(rng, inner_sweeps)
        reads += 1
        gap = _relative_gap(*state.objectives(stale))
        log.debug("svm epoch %d: estimated relative duality gap %.3g", epoch, gap)
        if gap <= tol:
            exact = state.exact_pass()
            reads += 1
            gap = _relative_gap(*state.objectives(exact[0]))
            log.debug("svm epoch %d: relative duality gap %.3g", epoch, gap)
            converged = gap <= tol
            if converged:
                break
            exact = None
    if exact is None:
        exact = state.exact_pass()
        reads += 1
    primal, dual = state.objectives(exact[0])
    gap = _relative_gap(primal, dual)
    if not converged:
        log.warning(
            "train_linear_svm: relative duality gap %.3g > tol %.3g after %d epochs; "
            "raise max_epochs or inner_sweeps",
            gap, tol, max_epochs,
        )  # fmt: skip
    info = {
        "epochs": epoch,
        "converged": converged,
        "reads": reads,
        "primal": primal,
        "dual": dual,
        "gap": gap,
        "objective": float(primal.sum()),
        "train_accuracy": exact[1] / (N * V),
        "seconds": time.perf_counter() - start,
    }
    return state.W, torch.from_numpy(state.b).to(state.W), info


class _DualState:
    """The dual variables and primal weights of K one-vs-all SVMs over a feature cache:
    ``alpha`` (N, V, K) on the host, ``W`` (K, D) float32 on the device, ``b`` (K,) float64 on
    the host (s^2 times the weight of the bias feature s, s = 1 or 0 without bias)."""

    def __init__(
        self,
        features: RowArray,
        y: np.ndarray,
        shape: tuple[int, int, int],
        num_classes: int,
        C: float,
        loss: str,
        bias: bool,
        batch_rows: int,
        device: torch.device | str,
    ) -> None:
        N, V, D = shape
        self.features, self.y, self.C, self.V = features, y, C, V
        self.batch_rows, self.device = batch_rows, torch.device(device)
        self.squared = loss == "squared_hinge"
        self.s2 = 1.0 if bias else 0.0
        self.upper, self.diag = (math.inf, 0.5 / C) if self.squared else (C, 0.0)
        self.Ysign = np.where(y[:, None] == np.arange(num_classes)[None, :], 1.0, -1.0)
        self.alpha = np.zeros((N, V, num_classes))
        self.W = torch.zeros(num_classes, D, device=self.device)
        self.b = np.zeros(num_classes)

    def _passes(self, order: np.ndarray) -> Iterator[tuple[np.ndarray, Tensor, np.ndarray]]:
        """Blocks of the cache in ``order``: indices, rows and (K, m) float64 decision values."""
        for idx, X in _blocks(self.features, order, self.batch_rows, self.device, torch.float32):
            bt = torch.from_numpy(self.b).to(self.W)
            yield idx, X, (self.W @ X.T + bt[:, None]).double().cpu().numpy()

    def epoch(self, rng: np.random.Generator, inner_sweeps: int) -> np.ndarray:
        """One pass of block coordinate descent; returns the losses seen on the way."""
        stale = np.zeros(self.W.shape[0])
        for idx, X, fT in self._passes(rng.permutation(len(self.y))):
            G = (X @ X.T).double().cpu().numpy() + self.s2
            A = self.alpha[idx].reshape(-1, self.W.shape[0])
            Y = np.repeat(self.Ysign[idx], self.V, axis=0)
            stale += _loss(fT, Y, self.squared)
            delta = _cd_block(fT, G, A, Y, self.upper, self.diag, inner_sweeps, rng)
            self.alpha[idx] = A.reshape(len(idx), self.V, -1)
            self.W += torch.from_numpy(delta.T).to(self.W) @ X
            self.b += self.s2 * delta.sum(0)
        return stale

    def objectives(self, loss_sum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Primal and dual objectives per class, given the primal's loss sums."""
        b_sq = self.b * self.b / self.s2 if self.s2 > 0 else 0.0
        wsq = (self.W.double() ** 2).sum(1).cpu().numpy() + b_sq
        a = self.alpha.reshape(-1, self.W.shape[0])
        dual = a.sum(0) - 0.5 * wsq - 0.5 * self.diag * (a * a).sum(0)
        return 0.5 * wsq + self.C * loss_sum, dual

    def exact_pass(self) -> tuple[np.ndarray, int]:
        """Loss sums and correct training views at the current solution (one read)."""
        loss_sum, correct = np.zeros(self.W.shape[0]), 0
        for idx, _, fT in self._passes(np.arange(len(self.y))):
            loss_sum += _loss(fT, np.repeat(self.Ysign[idx], self.V, axis=0), self.squared)
            correct += int((fT.argmax(0) == np.repeat(self.y[idx], self.V)).sum())
        return loss_sum, correct


@torch.no_grad()
def median_calibration(
    features: RowArray,
    labels: Any,
    W: Tensor,
    b: Tensor,
    batch_rows: int = 256,
) -> tuple[Tensor, Tensor]:
    """Rescales each class's SVM so its training scores have median 1 (positives), 0 (rest).

    The authors' "cheap calibration" (``model_train.m``): with mp and mn the medians of the
    class's positive and negative training views' scores, w <- w / (mp - mn) and
    b <- (b - mn) / (mp - mn); classes with mp <= mn are left as they are, with a warning.

    Args:
        features: ``(N, V, D)`` (or ``(N, D)``) training cache.
        labels: ``(N,)`` class indices.
        W: ``(K, D)`` weights from :func:`train_linear_svm`.
        b: ``(K,)`` intercepts.
        batch_rows: Images per block.

    Returns:
        Calibrated ``W`` and ``b`` (new tensors, same device and dtype).
    """
    N, V, D = _check_features(features, "median_calibration")
    if W.dim() != 2 or W.shape[1] != D or tuple(b.shape) != (W.shape[0],):
        raise ValueError(
            f"median_calibration: expected W (K, {D}) to match the features and b (K,), got "
            f"{tuple(W.shape)} and {tuple(b.shape)}"
        )
    K = W.shape[0]
    y = np.repeat(_check_labels(labels, N, K, "median_calibration"), V)
    scores = np.empty((N, V, K), dtype=np.float32)
    for idx, X in _blocks(features, np.arange(N), batch_rows, W.device, W.dtype):
        scores[idx] = (X @ W.T + b).view(len(idx), V, -1).float().cpu().numpy()
    flat = scores.reshape(N * V, K)
    positive = y[:, None] == np.arange(K)[None, :]

    def medians(rows: np.ndarray, empty: float) -> np.ndarray:
        return np.array([np.median(flat[rows[:, k], k]) if rows[:, k].any() else empty
                         for k in range(K)])  # fmt: skip

    mp, mn = medians(positive, 1.0), medians(~positive, 0.0)
    scale = mp - mn
    bad = ~(scale > 0)
    if bad.any():
        log.warning(
            "median_calibration: classes %s have mp <= mn; left uncalibrated", np.flatnonzero(bad)
        )
        scale[bad], mn[bad] = 1.0, 0.0
    s = torch.from_numpy(scale).to(W.device, W.dtype)
    m = torch.from_numpy(mn).to(W.device, W.dtype)
    return W / s[:, None], (b - m) / s
