"""Pooling heads, normalization steps and the low-rank classifier against direct formulas."""

from __future__ import annotations

import functools

import pytest
import torch

from bcnn.models.classifier import LowRankBilinearClassifier
from bcnn.models.normalization import (
    L2Normalize,
    MatrixLog,
    MatrixPower,
    MatrixSqrt,
    NormalizationChain,
    SignedPower,
    SignedSqrt,
    Vectorize,
    add_ridge,
)
from bcnn.models.pooling import (
    AvgPool,
    BilinearPool,
    CompactPool,
    DemocraticAvgPool,
    DemocraticPool,
)
from bcnn.models.shapes import FeatureShape
from bcnn.ops import RandomMaclaurin, democratic_weights


def _gram(b: int = 2, d: int = 6, n: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, n, generator=g, dtype=torch.float64)
    return x @ x.mT / n


def test_bilinear_pool_one_and_two_streams():
    xa, xb = torch.randn(2, 4, 3, 5), torch.randn(2, 6, 3, 5)
    sym = BilinearPool(4)(xa)
    torch.testing.assert_close(sym, torch.einsum("bchw,bdhw->bcd", xa, xa) / 15)
    assert BilinearPool(4).output_shape == FeatureShape((4, 4), symmetric=True)
    two = BilinearPool((4, 6))
    assert two.output_shape == FeatureShape((4, 6), symmetric=False)
    torch.testing.assert_close(two((xa, xb)), torch.einsum("bchw,bdhw->bcd", xa, xb) / 15)
    with pytest.raises(ValueError, match="built for 2 feature map"):
        two(xa)
    with pytest.raises(ValueError, match="equal spatial sizes"):
        two((xa, xb[:, :, :2]))


def test_avg_pool_concatenates_streams():
    xa, xb = torch.randn(2, 4, 3, 5), torch.randn(2, 6, 3, 5)
    pool = AvgPool((4, 6))
    assert pool.output_shape == FeatureShape((10,))
    torch.testing.assert_close(pool((xa, xb)), torch.cat([xa.mean((2, 3)), xb.mean((2, 3))], 1))


def test_single_stream_heads_reject_two_streams():
    for head in (DemocraticPool, DemocraticAvgPool):
        with pytest.raises(ValueError, match="does not combine two feature maps"):
            head((4, 4))


def test_democratic_gamma_one_is_sum_pooling():
    x = torch.randn(2, 5, 4, 4).relu()
    torch.testing.assert_close(DemocraticPool(5, gamma=1.0)(x), BilinearPool(5)(x))


def test_first_order_democratic_head():
    x = torch.randn(2, 5, 4, 4).relu() + 0.01
    head = DemocraticAvgPool(5, gamma=0.0, iters=50)
    assert head.output_shape == FeatureShape((5,))
    out = head(x)
    assert out.shape == (2, 5)
    # gamma = 0: every location's contribution x_i^T (sum_j alpha_j x_j) is the same.
    X = x.flatten(2).mT.double()
    alpha = democratic_weights(X, gamma=0.0, iters=50, order=1)
    contrib = alpha * (X @ (alpha[..., None] * X).sum(1)[..., None])[..., 0]
    torch.testing.assert_close(contrib, contrib[:, :1].expand_as(contrib))
    torch.testing.assert_close(out.double(), (alpha[..., None] * X).sum(1) / alpha.sum(1, True))
    # gamma = 1 is the avg head; the weights change the descriptor otherwise.
    torch.testing.assert_close(DemocraticAvgPool(5, gamma=1.0)(x), AvgPool(5)(x))
    assert float((out - AvgPool(5)(x)).abs().max()) > 1e-4


def test_matrix_power_step_after_sum_pooling():
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    a = BilinearPool(5)(x)
    for p in (0.3, 0.5):
        out = MatrixPower(p=p, method="eigh", eps=0.0)(a)
        vals, vecs = torch.linalg.eigh(a)
        want = vecs @ torch.diag_embed(vals.clamp_min(0) ** p) @ vecs.mT
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_compact_pool_two_streams_and_projection():
    sketch = functools.partial(RandomMaclaurin, out_dim=32, seed=0)
    pool = CompactPool((4, 6), sketch=sketch, proj_dim=3)
    assert pool.output_shape == FeatureShape((32,))
    out = pool((torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)))
    assert out.shape == (2, 32) and out.dtype == torch.float32
    assert len(pool.projection_parameters()) == 2
    assert pool.sketch.in_dim == 3 and pool.sketch.in_dim2 == 3  # after the projection


def test_ridge_modes():
    a = _gram()
    eye = torch.eye(6, dtype=a.dtype)
    torch.testing.assert_close(add_ridge(a, 0.5, "abs"), a + 0.5 * eye)
    mean_eig = a.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    torch.testing.assert_close(add_ridge(a, 0.1, "trace"), a + 0.1 * mean_eig * eye)
    # The trace mode is scale-free: scaling A scales the ridge with it.
    torch.testing.assert_close(add_ridge(1e3 * a, 0.1, "trace"), 1e3 * add_ridge(a, 0.1, "trace"))


def test_matrix_steps_match_eigendecomposition():
    a = _gram()
    vals, vecs = torch.linalg.eigh(a + 1e-3 * torch.eye(6, dtype=a.dtype))

    def f(fn):
        return vecs @ torch.diag_embed(fn(vals)) @ vecs.mT

    sqrt = MatrixSqrt(method="newton_schulz", iters=30, eps=1e-3, eps_mode="abs")(a)
    torch.testing.assert_close(sqrt, f(torch.sqrt), rtol=1e-5, atol=1e-6)
    log = MatrixLog(eps=1e-3, eps_mode="abs")(a)
    torch.testing.assert_close(log, f(torch.log), rtol=1e-6, atol=1e-6)
    power = MatrixPower(p=0.3, eps=1e-3, eps_mode="abs")(a)
    torch.testing.assert_close(power, f(lambda v: v**0.3), rtol=1e-6, atol=1e-6)


def test_elementwise_power_guarded_gradient():
    z = torch.tensor([-4.0, -1e-12, 0.0, 1e-12, 9.0], requires_grad=True)
    out = SignedPower(p=0.5, eps=1e-8)(z)
    torch.testing.assert_close(out[[0, 4]], torch.tensor([-2.0, 3.0]), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad.max() <= 0.5 * (1e-8) ** -0.5 + 1e-3
    with pytest.raises(ValueError, match=r"'SignedPower\.p': must be in \(0, 1\]"):
        SignedPower(p=1.5)
    with pytest.raises(ValueError, match=r"'SignedSqrt\.eps': must be finite"):
        SignedSqrt(eps=float("nan"))


def test_chain_without_vectorize_applies_elementwise_steps_to_the_matrix():
    chain = NormalizationChain(
        sqrt=MatrixSqrt(method="eigh"), signsqrt=SignedSqrt(), l2=L2Normalize()
    )
    out = chain(_gram().float())
    assert out.shape == (2, 6, 6)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out, out.mT)
    assert chain.output_shape(FeatureShape((6, 6), True)) == FeatureShape((6, 6), True)


def test_chain_orders_steps_by_phase_and_reports_shapes():
    chain = NormalizationChain(l2=L2Normalize(), vec=Vectorize(triu=True), log=MatrixLog())
    assert list(chain.steps) == ["log", "vec", "l2"]
    assert chain.output_shape(FeatureShape((6, 6), True)) == FeatureShape((21,))
    out = chain(_gram())
    assert out.shape == (2, 21)
    # The upper triangle with sqrt(2) off the diagonal keeps Frobenius inner products.
    m = MatrixLog()(_gram())
    torch.testing.assert_close(out, Vectorize(True)(m) / m.flatten(1).norm(dim=1, keepdim=True))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, dtype=out.dtype))
    with pytest.raises(ValueError, match=r"normalization\.log: MatrixLog acts on matrices"):
        chain.output_shape(FeatureShape((12,)))


def test_chain_rejects_non_steps_and_bad_values():
    with pytest.raises(ValueError, match=r"normalization\.l2 must be a normalization step"):
        NormalizationChain(l2="yes")
    with pytest.raises(ValueError, match=r"'MatrixSqrt\.eps_mode': must be one of abs, trace"):
        MatrixSqrt(eps_mode="relative")
    with pytest.raises(ValueError, match=r"'MatrixLog\.eps': must be finite"):
        MatrixLog(eps=float("nan"))
    assert list(NormalizationChain(l2=None, vectorize=Vectorize()).steps) == ["vectorize"]


def test_matrix_steps_stay_float32_under_autocast():
    chain = NormalizationChain(sqrt=MatrixSqrt(), vectorize=Vectorize(), signsqrt=SignedSqrt())
    x = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = BilinearPool(8)(torch.nn.Conv2d(8, 8, 1)(x))
        out = chain(pooled)
    assert pooled.dtype == torch.float32 and out.dtype == torch.float32


@pytest.mark.parametrize("shape", [6, (6, 4)])
def test_lowrank_classifier_matches_explicit_weight_matrices(shape):
    torch.manual_seed(0)
    dims = (shape, shape) if isinstance(shape, int) else shape
    clf = LowRankBilinearClassifier(FeatureShape(dims, isinstance(shape, int)), 3, rank=3)
    with torch.no_grad():
        clf.bias.normal_()
    d1, d2 = (shape, shape) if isinstance(shape, int) else shape
    a = torch.randn(2, d1, d2)
    U = clf.U.view(3, 3, d1)
    if isinstance(shape, int):
        # W_k = U+ U+^T - U- U-^T: ranks 0, 1 positive and 2 negative.
        W = torch.einsum("kri,krj,r->kij", U, U, torch.tensor([1.0, 1.0, -1.0]))
    else:
        W = torch.einsum("kri,krj->kij", U, clf.V.view(3, 3, d2))
    want = torch.einsum("bij,kij->bk", a, W) + clf.bias
    torch.testing.assert_close(clf(a), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        clf(torch.randn(2, d1 + 1, d2))
