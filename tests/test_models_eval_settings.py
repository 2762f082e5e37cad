"""Matrix steps with one method while a gradient flows and another for frozen features."""

from __future__ import annotations

import pytest
import torch

from bcnn.models.normalization import MatrixLog, MatrixPower, MatrixSqrt, add_ridge
from bcnn.ops import logm, sqrtm


def _gram(seed: int = 0, b: int = 2, d: int = 6, n: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64).relu()
    return x.transpose(1, 2) @ x / n


def _step() -> MatrixSqrt:
    # BMVC 2017's fine-tuning protocol: exact root and Lyapunov gradient while training,
    # one Newton-Schulz iteration (here, to make the difference large) for frozen features.
    return MatrixSqrt(
        method="eigh", backward="lyapunov_eig", eval_method="newton_schulz", eval_iters=1
    )


def test_sqrt_uses_the_exact_root_while_trained_through_and_newton_schulz_otherwise() -> None:
    a = _gram()
    ridged = add_ridge(a, 1e-4, "trace")
    exact = sqrtm(ridged, method="eigh")
    one_step = sqrtm(ridged, method="newton_schulz", iters=1)
    assert (exact - one_step).abs().max() > 1e-2  # the two settings differ visibly
    step = _step().train()

    leaf = a.clone().requires_grad_(True)
    out = step(leaf)
    torch.testing.assert_close(out, exact)
    # The gradient is the exact one (lyapunov_eig) of the exact root.
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), leaf)
    ref_leaf = a.clone().requires_grad_(True)
    ref = sqrtm(add_ridge(ref_leaf, 1e-4, "trace"), method="eigh", backward="lyapunov_eig")
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), ref_leaf)
    torch.testing.assert_close(grad, ref_grad)

    # No gradient flows: frozen features in training mode, autograd off, evaluation.
    torch.testing.assert_close(step(a), one_step)
    with torch.no_grad():
        torch.testing.assert_close(step(a.clone().requires_grad_(True)), one_step)
    torch.testing.assert_close(step.eval()(a.clone().requires_grad_(True)), one_step)


def test_without_eval_settings_nothing_changes() -> None:
    a = _gram(1)
    step = MatrixSqrt(method="newton_schulz", iters=3)
    expected = sqrtm(add_ridge(a, 1e-4, "trace"), method="newton_schulz", iters=3)
    torch.testing.assert_close(step.train()(a.clone().requires_grad_(True)), expected)
    torch.testing.assert_close(step.eval()(a), expected)
    assert step.settings(True) == step.settings(False) == ("newton_schulz", 3)
    # eval_iters alone keeps the method.
    assert MatrixSqrt(iters=20, eval_iters=5).settings(False) == ("newton_schulz", 5)


def test_power_and_log_follow_the_same_rule() -> None:
    a = _gram(2)
    ridged = add_ridge(a, 1e-4, "trace")
    power = MatrixPower(p=0.5, method="eigh", backward="lyapunov_eig", eval_method="newton_schulz")
    torch.testing.assert_close(power.eval()(a), sqrtm(ridged, method="newton_schulz", iters=5))
    torch.testing.assert_close(
        power.train()(a.clone().requires_grad_(True)), sqrtm(ridged, method="eigh")
    )
    log = MatrixLog(method="eigh", eval_method="iterative").eval()
    expected = logm(ridged, method="iterative", eps=1e-10)
    torch.testing.assert_close(log(a), expected)
    assert "eval_method=iterative" in repr(log)
    assert "eval_method=newton_schulz, eval_iters=1" in repr(_step())


def test_a_training_step_with_eval_settings_keeps_the_dxd_route() -> None:
    # Which settings apply is only known from the input: the fused n x n route (which
    # chooses before it sees the input) is not taken in training mode, and is taken for
    # the evaluation settings in eval mode when they allow it.
    step = MatrixSqrt(method="eigh", backward="lyapunov_eig", eval_method="newton_schulz")
    assert step.train().small_side(n=49, d=512, device_type="cpu") is None
    plain = MatrixSqrt(method="eigh", backward="lyapunov_eig")
    assert plain.train().small_side(n=49, d=512, device_type="cpu") is not None
    exact_at_eval = MatrixSqrt(method="newton_schulz", backward="lyapunov_eig", eval_method="eigh")
    assert exact_at_eval.eval().small_side(n=49, d=512, device_type="cpu") is not None


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MatrixSqrt(eval_method="exact"), r"'MatrixSqrt\.eval_method': must be one of"),
        (lambda: MatrixSqrt(method="qr"), r"'MatrixSqrt\.method': must be one of"),
        (lambda: MatrixSqrt(eval_iters=-1), r"'MatrixSqrt\.eval_iters': must be in \[0, 1000\]"),
        (lambda: MatrixLog(eval_method="newton_schulz"), r"'MatrixLog\.eval_method': must be one"),
        (lambda: MatrixLog(method="iterative", eps=0), r"'MatrixLog\.eps': must be > 0"),
        (
            lambda: MatrixSqrt(method="eigh", backward="autograd"),
            r"'MatrixSqrt\.backward': backward='autograd' differentiates",
        ),
        (lambda: MatrixPower(p=0.3, eval_method="newton_schulz"), r"p = 0.5 only"),
    ],
)
def test_bad_settings_are_rejected_by_key(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
