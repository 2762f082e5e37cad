"""The training and evaluation loops, unit by unit: each option is shown to take effect."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bcnn.engine.loops import evaluate, train_one_epoch
from tests.conftest import REPO_ROOT, subprocess_env

CPU = torch.device("cpu")


def _data(n: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _after_one_epoch(batch_size: int, **options) -> nn.Module:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(_data(), batch_size=batch_size, shuffle=False)
    train_one_epoch(model, loader, optimizer, CPU, **options)
    return model


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_grad_accum_over_small_batches_equals_one_step_over_the_whole_batch() -> None:
    whole = _after_one_epoch(batch_size=16)
    accumulated = _after_one_epoch(batch_size=4, grad_accum=4)
    assert torch.allclose(_params(whole), _params(accumulated), atol=1e-6)
    # Without accumulation the same micro-batches take four steps: a different result.
    assert not torch.allclose(_params(whole), _params(_after_one_epoch(batch_size=4)), atol=1e-4)


def test_grad_clip_changes_the_update_and_bounds_its_norm() -> None:
    start = _params(_model())
    free = _params(_after_one_epoch(batch_size=16)) - start
    clipped = _params(_after_one_epoch(batch_size=16, grad_clip=1e-3)) - start
    # One SGD step of lr 0.5 on a gradient clipped to norm 1e-3.
    assert clipped.norm() == pytest.approx(0.5e-3, rel=1e-4)
    assert free.norm() > 10 * clipped.norm()


def test_max_batches_stops_early_and_stats_count_what_was_seen() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(_data(), batch_size=4)
    stats = train_one_epoch(model, loader, optimizer, CPU, max_batches=2)
    assert stats.seen == 8
    x, y = _data().tensors
    with torch.no_grad():
        logits = model(x[:8])
    expected = torch.nn.functional.cross_entropy(logits, y[:8])
    assert stats.loss == pytest.approx(float(expected), rel=1e-6)
    assert stats.correct == int((logits.argmax(1) == y[:8]).sum())


def test_bf16_precision_runs_the_model_under_autocast() -> None:
    seen = []
    model = _model()
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(_data(), batch_size=8)
    train_one_epoch(model, loader, optimizer, CPU, precision="bf16")
    train_one_epoch(model, loader, optimizer, CPU)
    assert seen == [torch.bfloat16] * 2 + [torch.float32] * 2


def test_fp16_scaler_scales_the_loss_and_skips_non_finite_steps() -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = _data(8).tensors
    x[0, 0] = float("inf")  # a non-finite gradient: the scaler must skip the step
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    train_one_epoch(model, loader, optimizer, CPU, scaler=scaler)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 2.0**9  # backed off after the skipped step


def test_flip_averages_the_softmax_of_the_two_views() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 4, 3))
    images = torch.randn(6, 3, 2, 4)
    labels = torch.arange(6) % 3
    loader = DataLoader(TensorDataset(images, labels), batch_size=3)
    flipped = evaluate(net, loader, 3, CPU, flip=True)
    plain = evaluate(net, loader, 3, CPU, flip=False)
    with torch.no_grad():
        mean = (net(images).softmax(1) + net(images.flip(-1)).softmax(1)) / 2
    expected = torch.zeros(3, 3, dtype=torch.long)
    for t, p in zip(labels.tolist(), mean.argmax(1).tolist()):
        expected[t, p] += 1
    assert torch.equal(flipped.matrix, expected)
    assert flipped.count == plain.count == 6
    assert not torch.equal(flipped.matrix, plain.matrix)  # the views disagree here


def test_label_smoothing_and_mixed_targets_reach_the_loss() -> None:
    x, y = _data(8)[:]

    def one_step(**options) -> tuple[float, int]:
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        stats = train_one_epoch(model, [(x, y)], optimizer, CPU, **options)
        return stats.loss, stats.correct

    with torch.no_grad():
        logits, flipped = _model()(x), _model()(x.flip(0))
    smoothed = nn.functional.cross_entropy(logits, y, label_smoothing=0.2)
    assert one_step(label_smoothing=0.2)[0] == pytest.approx(float(smoothed), rel=1e-6)
    assert one_step()[0] != pytest.approx(float(smoothed), rel=1e-3)

    def mix(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images.flip(0), torch.full((len(labels), 3), 1 / 3)

    loss, correct = one_step(mix=mix)
    assert loss == pytest.approx(float(-flipped.log_softmax(1).mean(1).mean()), rel=1e-6)
    # Accuracy is counted against the labels, on the mixed images.
    assert correct == int((flipped.argmax(1) == y).sum())


def test_after_step_sees_each_optimizer_step() -> None:
    losses: list[float] = []
    loader = DataLoader(_data(), batch_size=4)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def record(loss: torch.Tensor) -> None:
        losses.append(float(loss))

    train_one_epoch(model, loader, optimizer, CPU, grad_accum=2, after_step=record)
    assert len(losses) == 2  # 4 batches, one step per 2


def test_importing_the_loops_does_not_import_the_trainer() -> None:
    code = "import sys, bcnn.engine.loops; sys.exit('bcnn.engine.trainer' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    from bcnn.engine import train  # the package still offers it, on first use

    assert train.__module__ == "bcnn.engine.trainer"
