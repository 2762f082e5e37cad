"""One-vs-all linear SVM on cached descriptors: agreement with LIBLINEAR, streaming, views."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn import svm as sklearn_svm

from bcnn.models.svm import median_calibration, train_linear_svm

N_CLASSES, DIM, VIEWS = 5, 64, 2


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes, a jittered second view, L2-normalized like bcnn's chains."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(N_CLASSES, DIM)) * 0.3
    y = rng.integers(0, N_CLASSES, n)
    base = centers[y] + rng.normal(size=(n, DIM))
    views = np.stack([base + 0.3 * rng.normal(size=(n, DIM)) for _ in range(VIEWS)], 1)
    views /= np.linalg.norm(views, axis=-1, keepdims=True)
    return views.astype(np.float32), y


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    Xtr, ytr = blobs(300, seed=0)
    Xte, yte = blobs(400, seed=1)
    return {"Xtr": Xtr, "ytr": ytr, "Xte": Xte, "yte": yte}


def primal(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray, loss: str) -> np.ndarray:
    """0.5 (||w_k||^2 + b_k^2) + sum_i loss_k(x_i): LIBLINEAR's objective with s = 1."""
    Y = np.where(y[:, None] == np.arange(W.shape[0]), 1.0, -1.0)
    h = np.maximum(0.0, 1.0 - Y * (X @ W.T + b))
    return 0.5 * ((W**2).sum(1) + b**2) + (h if loss == "hinge" else h * h).sum(0)


@pytest.mark.parametrize(("loss", "tol"), [("squared_hinge", 1e-5), ("hinge", 1e-4)])
def test_agrees_with_liblinear(data: dict[str, np.ndarray], loss: str, tol: float) -> None:
    Xtr, ytr, Xte, yte = data["Xtr"], data["ytr"], data["Xte"], data["yte"]
    W, b, info = train_linear_svm(Xtr, ytr, N_CLASSES, C=1.0, loss=loss, tol=tol, batch_rows=64)
    assert info["converged"] and 0 <= info["gap"] <= tol
    # Weak duality (up to the float32 rounding of W).
    assert np.all(info["primal"] >= info["dual"] - 1e-6 * info["primal"])

    rows, labels = Xtr.reshape(-1, DIM), np.repeat(ytr, VIEWS)
    ref = sklearn_svm.LinearSVC(C=1.0, loss=loss, dual=True, tol=1e-5, max_iter=100_000)
    ref.fit(rows, labels)
    ours_scores = (torch.from_numpy(Xte) @ W.T + b).mean(1).numpy()
    ref_scores = ref.decision_function(Xte.reshape(-1, DIM)).reshape(len(yte), VIEWS, -1).mean(1)
    acc = (ours_scores.argmax(1) == yte).mean()
    ref_acc = (ref_scores.argmax(1) == yte).mean()
    assert 0.5 < ref_acc < 0.95  # the fixture overlaps: the comparison means something
    assert abs(acc - ref_acc) <= 0.005
    assert np.corrcoef(ours_scores.ravel(), ref_scores.ravel())[0, 1] > 0.999

    # Our objective at our solution equals the reported one and is no worse than LIBLINEAR's.
    ours = primal(W.double().numpy(), b.double().numpy(), rows.astype(np.float64), labels, loss)
    np.testing.assert_allclose(ours, info["primal"], rtol=1e-6)
    theirs = primal(ref.coef_, ref.intercept_, rows.astype(np.float64), labels, loss)
    assert np.all(ours <= theirs * (1 + tol))
    # And LIBLINEAR's solution is no better than our dual bound.
    assert np.all(theirs >= info["dual"] * (1 - 1e-7))


def test_without_bias(data: dict[str, np.ndarray]) -> None:
    Xtr, ytr = data["Xtr"], data["ytr"]
    W, b, _ = train_linear_svm(Xtr, ytr, N_CLASSES, loss="squared_hinge", bias=False, tol=1e-6)
    assert torch.count_nonzero(b) == 0
    ref = sklearn_svm.LinearSVC(C=1.0, fit_intercept=False, dual=True, tol=1e-6, max_iter=100_000)
    ref.fit(Xtr.reshape(-1, DIM), np.repeat(ytr, VIEWS))
    np.testing.assert_allclose(W.numpy(), ref.coef_, atol=2e-3)


class CountingRows:
    """A read-only cache that records every read (what a memory map would page in)."""

    def __init__(self, array: np.ndarray) -> None:
        self._array = array
        self.shape, self.dtype = array.shape, array.dtype
        self.largest = 0
        self.rows_read = 0

    def __getitem__(self, index: Any) -> np.ndarray:
        rows = len(np.arange(self.shape[0])[index])
        self.largest = max(self.largest, rows)
        self.rows_read += rows
        return self._array[index]


def test_streams_a_float16_memmap(data: dict[str, np.ndarray], tmp_path: Path) -> None:
    Xtr, ytr = data["Xtr"], data["ytr"]
    path = tmp_path / "features.npy"
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=Xtr.shape)
    store[:] = Xtr
    store.flush()
    del store
    cache = CountingRows(np.load(path, mmap_mode="r"))
    assert isinstance(cache._array, np.memmap)

    W, b, info = train_linear_svm(cache, ytr, N_CLASSES, batch_rows=32, tol=1e-3)
    assert cache.largest <= 32
    assert cache.rows_read == info["reads"] * len(ytr)  # every pass reads each image once
    # The same float16 values held in memory as float32 give the same model.
    W2, b2, info2 = train_linear_svm(
        Xtr.astype(np.float16).astype(np.float32), ytr, N_CLASSES, batch_rows=32, tol=1e-3
    )
    assert info2["epochs"] == info["epochs"]
    torch.testing.assert_close(W, W2, rtol=0, atol=0)
    torch.testing.assert_close(b, b2, rtol=0, atol=0)

    cache.largest = 0
    Wc, bc = median_calibration(cache, ytr, W, b, batch_rows=16)  # streams too
    assert cache.largest <= 16
    assert Wc.shape == W.shape and bc.shape == b.shape


def test_deterministic_and_view_order_free(data: dict[str, np.ndarray]) -> None:
    Xtr, ytr = data["Xtr"], data["ytr"]
    W1, b1, _ = train_linear_svm(Xtr, ytr, N_CLASSES, tol=1e-3, seed=3)
    W2, b2, _ = train_linear_svm(Xtr, ytr, N_CLASSES, tol=1e-3, seed=3)
    torch.testing.assert_close(W1, W2, rtol=0, atol=0)
    torch.testing.assert_close(b1, b2, rtol=0, atol=0)
    # Views are samples like any other: a (N V, D) cache gives the same optimum.
    tol, sq = 1e-5, "squared_hinge"
    flat = train_linear_svm(
        Xtr.reshape(-1, DIM), np.repeat(ytr, VIEWS), N_CLASSES, loss=sq, tol=tol
    )
    views = train_linear_svm(Xtr, ytr, N_CLASSES, loss=sq, tol=tol)
    np.testing.assert_allclose(flat[2]["primal"], views[2]["primal"], rtol=tol)
    torch.testing.assert_close(flat[0], views[0], atol=5e-4, rtol=0)
    torch.testing.assert_close(flat[1], views[1], atol=5e-4, rtol=0)


def test_median_calibration(data: dict[str, np.ndarray]) -> None:
    Xtr, ytr = data["Xtr"], data["ytr"]
    W, b, _ = train_linear_svm(Xtr, ytr, N_CLASSES, tol=1e-3)
    Wc, bc = median_calibration(Xtr, ytr, W, b, batch_rows=50)
    scores = (torch.from_numpy(Xtr.reshape(-1, DIM)) @ Wc.T + bc).numpy()
    labels = np.repeat(ytr, VIEWS)
    for k in range(N_CLASSES):
        assert np.median(scores[labels == k, k]) == pytest.approx(1.0, abs=1e-5)
        assert np.median(scores[labels != k, k]) == pytest.approx(0.0, abs=1e-5)


def test_bad_inputs_are_named(data: dict[str, np.ndarray]) -> None:
    Xtr, ytr = data["Xtr"], data["ytr"]
    with pytest.raises(ValueError, match=r"labels must have shape \(300,\)"):
        train_linear_svm(Xtr, ytr[:-1], N_CLASSES)
    with pytest.raises(ValueError, match=r"\[0, num_classes=4\)"):
        train_linear_svm(Xtr, ytr, 4)
    with pytest.raises(ValueError, match="loss"):
        train_linear_svm(Xtr, ytr, N_CLASSES, loss="logistic")
    with pytest.raises(ValueError, match=r"\(N, V, D\)"):
        train_linear_svm(Xtr[0, 0], ytr, N_CLASSES)
    with pytest.raises(TypeError, match="integers"):
        train_linear_svm(Xtr, ytr.astype(np.float32), N_CLASSES)
    with pytest.raises(ValueError, match=r"W \(K, 64\)"):
        median_calibration(Xtr, ytr, torch.zeros(N_CLASSES, 10), torch.zeros(N_CLASSES))
