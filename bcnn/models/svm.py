"""One-vs-all linear SVMs trained on cached descriptors, streamed from a memory map.

The papers' "no fine-tuning" rows train, for each class k, a linear SVM (C = 1) on the
descriptors of the training images and of their mirror images, and average the scores of
an image and its flip at test time. Per class, with y_ik = +1 for class k and -1 otherwise,
over every view x_i of every training image:

    min_{w_k, b_k}  0.5 (||w_k||^2 + b_k^2 / s^2) + C sum_i loss(y_ik (w_k . x_i + b_k))

with loss(m) = max(0, 1 - m) (``"hinge"``) or max(0, 1 - m)^2 (``"squared_hinge"``); the
bias is LIBLINEAR's (and VLFeat's ``'BiasMultiplier'``): a regularized constant feature
s = ``intercept_scaling``.

Algorithm: dual coordinate descent (Hsieh et al., ICML 2008; LIBLINEAR's ``-s 1`` and
``-s 3``) for all classes at once, over blocks of ``batch_rows`` images: the dual variables
live on the host, W on the device; per block, the decision values and Gram matrix come
from the device and each row takes one exact coordinate step (``_cd_block``), in seeded
random order (deterministic given the data and ``seed``). Training stops on the relative
duality gap of every class, as VLFeat's ``vl_svmtrain`` (which the authors call with
``'epsilon', 1e-3``). Memory: W, the alphas (N V K float64) and two blocks, never a second
copy of the cache. Cost and convergence: docs/ops.md.
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
    if len(shape) == 2:
        return shape[0], 1, shape[1]
    return shape[0], shape[1], shape[2]


def _read(features: RowArray, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` (sorted) of the cache as a (b, V, D) host array (one copy of b rows)."""
    block = np.asarray(features[index])
    if block.ndim == 2:
        block = block[:, None]
    return np.ascontiguousarray(block)


def _to_device(block: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(b, V, D) host rows -> (b V, D) on ``device`` in ``dtype`` (cast after the copy)."""
    t = torch.from_numpy(block)
    t = t.to(device).to(dtype)
    return t.reshape(-1, t.shape[-1])


def _blocks(
    features: RowArray, order: np.ndarray, batch_rows: int, device: torch.device, dtype
) -> Iterator[tuple[np.ndarray, Tensor]]:
    """Yields (sorted image indices, (b V, D) device rows), reading one block ahead."""
    chunks = [np.sort(order[s : s + batch_rows]) for s in range(0, len(order), batch_rows)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read, features, chunks[0])
        for i, idx in enumerate(chunks):
            block = pending.result()
            if i + 1 < len(chunks):
                pending = pool.submit(_read, features, chunks[i + 1])
            yield idx, _to_device(block, device, dtype)
            del block


def _check_model(W: Tensor, b: Tensor, D: int, name: str) -> None:
    if W.dim() != 2 or W.shape[1] != D or tuple(b.shape) != (W.shape[0],):
        raise ValueError(
            f"{name}: expected W (K, {D}) to match the features and b (K,), got "
            f"{tuple(W.shape)} and {tuple(b.shape)}"
        )


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

    For row j and every class: gradient g = y f_j - 1 + D_jj alpha_j, then
    alpha_j <- clip(alpha_j - g / Qbar_jj, 0, U) (the exact minimizer along that
    coordinate), and the block's decision values move by G[j] * delta.

    Args:
        fT: ``(K, m)`` current decision values of the block's rows (updated in place).
        G: ``(m, m)`` Gram matrix of the block's augmented rows.
        A: ``(m, K)`` dual variables of the block's rows (updated in place).
        Y: ``(m, K)`` +-1 targets.
        upper: Box bound U (inf for the squared hinge).
        diag: Diagonal D_jj added to the dual Hessian (0 for the hinge).
        sweeps: Passes over the block's rows.
        rng: Row order.

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


def _check_options(
    loss: str, C: float, batch_rows: int, max_epochs: int, inner_sweeps: int
) -> None:
    """Raises ValueError naming the first invalid option of ``train_linear_svm``."""
    if loss not in LOSSES:
        raise ValueError(f"train_linear_svm: loss must be one of {LOSSES}, got {loss!r}")
    if C <= 0:
        raise ValueError(f"train_linear_svm: C must be > 0, got {C}")
    if batch_rows < 1 or max_epochs < 1 or inner_sweeps < 1:
        raise ValueError("train_linear_svm: batch_rows, max_epochs and inner_sweeps must be >= 1")


def _descend(
    state: _DualState, rng: np.random.Generator, tol: float, max_epochs: int, inner_sweeps: int
) -> tuple[int, bool, int, tuple[np.ndarray, int]]:
    """Coordinate-descent epochs until the exact duality gap is within ``tol``.

    Returns:
        ``(epochs, converged, reads, exact)``: ``reads`` counts the passes over the cache
        (the final exact one included) and ``exact`` is ``state.exact_pass()`` at the end.
    """
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
            if gap <= tol:
                converged = True
                break
            exact = None
    if exact is None:
        exact = state.exact_pass()
        reads += 1
    return epoch, converged, reads, exact


def train_linear_svm(
    features: RowArray,
    labels: Any,
    num_classes: int,
    C: float = 1.0,
    loss: str = "hinge",
    bias: bool = True,
    intercept_scaling: float = 1.0,
    tol: float = 1e-3,
    max_epochs: int = 200,
    inner_sweeps: int = 3,
    batch_rows: int = 256,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Trains K one-vs-all linear SVMs on every view of every image of a feature cache.

    See the module docstring. Stopping: once every class's relative duality gap
    (P_k - D_k) / P_k, estimated during an epoch, is at most ``tol``, one read of the cache
    computes the exact primal, and training stops if the exact gap is within ``tol`` too
    (the gap bounds the relative suboptimality of the primal).

    Args:
        features: ``(N, V, D)`` (or ``(N, D)``) array-like with numpy indexing (a feature
            cache's float16/float32 memory map): every view is a sample with its label.
        labels: ``(N,)`` integer class indices in ``[0, num_classes)``.
        num_classes: K.
        C: Weight of the loss.
        loss: ``"hinge"`` (``vl_svmtrain``'s) or ``"squared_hinge"`` (``LinearSVC``'s).
        bias: Learn an intercept (a regularized constant feature ``intercept_scaling``).
        intercept_scaling: s; as ``LinearSVC``'s (1 = VLFeat's ``'BiasMultiplier', 1``).
        tol: Target relative duality gap, per class.
        max_epochs: Maximum number of coordinate-descent passes over the cache.
        inner_sweeps: Passes over each block while it is in memory (more work per read).
        batch_rows: Images (first-axis rows of ``features``) per block.
        device: Where W and the block products live (``"cuda"`` for real sizes).
        dtype: Device compute dtype of the blocks and W.
        seed: Seed of the row orders.

    Returns:
        ``W`` ``(K, D)`` and ``b`` ``(K,)`` on ``device`` in ``dtype`` (decision value
        ``x @ W.T + b``), and ``info``: ``epochs``, ``converged``, ``reads`` (passes over
        the cache), ``primal`` and ``dual`` (``(K,)`` float64 objectives; primal >= optimum
        >= dual), ``gap``, ``objective`` (sum of ``primal``), ``train_accuracy`` (per
        view), ``seconds``.
    """
    N, V, _ = _check_features(features, "train_linear_svm")
    y = _check_labels(labels, N, num_classes, "train_linear_svm")
    _check_options(loss, C, batch_rows, max_epochs, inner_sweeps)
    start = time.perf_counter()
    state = _DualState(
        features, y, num_classes, C, loss, intercept_scaling if bias else 0.0,
        batch_rows, torch.device(device), dtype,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    epoch, converged, reads, exact = _descend(state, rng, tol, max_epochs, inner_sweeps)
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
    return state.W, torch.from_numpy(state.b).to(device=state.device, dtype=dtype), info


class _DualState:
    """The dual variables and primal weights of K one-vs-all SVMs over a feature cache.

    ``alpha`` (N, V, K) on the host, ``W`` (K, D) on the device, ``b`` (K,) float64 on the
    host (s times the weight of the bias feature of value s, as LinearSVC).
    """

    def __init__(
        self,
        features: RowArray,
        y: np.ndarray,
        num_classes: int,
        C: float,
        loss: str,
        intercept_scaling: float,
        batch_rows: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        N, V, D = _check_features(features, "train_linear_svm")
        self.features, self.y, self.C, self.V = features, y, C, V
        self.batch_rows, self.device, self.dtype = batch_rows, device, dtype
        self.squared = loss == "squared_hinge"
        self.s2 = float(intercept_scaling) ** 2
        self.upper, self.diag = (math.inf, 0.5 / C) if self.squared else (C, 0.0)
        self.Ysign = np.where(y[:, None] == np.arange(num_classes)[None, :], 1.0, -1.0)
        self.alpha = np.zeros((N, V, num_classes))
        self.W = torch.zeros(num_classes, D, device=device, dtype=dtype)
        self.b = np.zeros(num_classes)

    def _scores(self, X: Tensor) -> np.ndarray:
        """(K, m) float64 decision values of the rows of block X."""
        bt = torch.from_numpy(self.b).to(device=self.device, dtype=self.dtype)
        return (self.W @ X.T + bt[:, None]).double().cpu().numpy()

    def epoch(self, rng: np.random.Generator, inner_sweeps: int) -> np.ndarray:
        """One pass of block coordinate descent; returns the losses seen on the way."""
        stale = np.zeros(self.W.shape[0])
        N = len(self.y)
        for idx, X in _blocks(self.features, rng.permutation(N), self.batch_rows, self.device,
                              self.dtype):  # fmt: skip
            fT = self._scores(X)
            G = (X @ X.T).double().cpu().numpy() + self.s2
            A = self.alpha[idx].reshape(-1, self.W.shape[0])
            Y = np.repeat(self.Ysign[idx], self.V, axis=0)
            stale += _loss(fT, Y, self.squared)
            delta = _cd_block(fT, G, A, Y, self.upper, self.diag, inner_sweeps, rng)
            self.alpha[idx] = A.reshape(len(idx), self.V, -1)
            self.W += torch.from_numpy(delta.T).to(device=self.device, dtype=self.dtype) @ X
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
        N = len(self.y)
        for idx, X in _blocks(self.features, np.arange(N), self.batch_rows, self.device,
                              self.dtype):  # fmt: skip
            fT = self._scores(X)
            loss_sum += _loss(fT, np.repeat(self.Ysign[idx], self.V, axis=0), self.squared)
            correct += int((fT.argmax(0) == np.repeat(self.y[idx], self.V)).sum())
        return loss_sum, correct


@torch.no_grad()
def svm_scores(
    features: RowArray,
    W: Tensor,
    b: Tensor,
    batch_rows: int = 256,
) -> Tensor:
    """Decision values averaged over the views (flip-averaged test scores).

    Args:
        features: ``(N, V, D)`` (or ``(N, D)``) array-like, read ``batch_rows`` rows at a
            time.
        W: ``(K, D)`` weights; the blocks go to its device and dtype.
        b: ``(K,)`` intercepts.
        batch_rows: Images per block.

    Returns:
        ``(N, K)`` float32 on the CPU: mean over views of ``x_v @ W.T + b``.
    """
    N, V, D = _check_features(features, "svm_scores")
    _check_model(W, b, D, "svm_scores")
    out = torch.empty(N, W.shape[0], dtype=torch.float32)
    for idx, X in _blocks(features, np.arange(N), batch_rows, W.device, W.dtype):
        f = (X @ W.T + b).view(len(idx), V, -1).mean(1)
        out[torch.from_numpy(idx)] = f.float().cpu()
    return out


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
    _check_model(W, b, D, "median_calibration")
    K = W.shape[0]
    y = np.repeat(_check_labels(labels, N, K, "median_calibration"), V)
    scores = np.empty((N * V, K), dtype=np.float32)
    for idx, X in _blocks(features, np.arange(N), batch_rows, W.device, W.dtype):
        rows = (idx[:, None] * V + np.arange(V)[None, :]).ravel()
        scores[rows] = (X @ W.T + b).float().cpu().numpy()
    positive = y[:, None] == np.arange(K)[None, :]

    def medians(rows: np.ndarray, empty: float) -> np.ndarray:
        return np.array([np.median(scores[rows[:, k], k]) if rows[:, k].any() else empty
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
