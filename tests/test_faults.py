"""Fault injection: bad checkpoints, kills during writes, a full disk, divergence, and
concurrent runs on one cache or one run directory."""

from __future__ import annotations

import collections
import errno
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from bcnn.engine import cache, checkpoint, train
from bcnn.engine import distributed as D
from bcnn.engine import stage as stage_module
from bcnn.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_resumable,
    previous_path,
    save_atomic,
    save_checkpoint,
)
from bcnn.engine.loops import train_one_epoch
from bcnn.engine.runs import RunDirectoryError, load_trained
from bcnn.engine.trainer import DivergenceError
from bcnn.models import build_model
from tests.conftest import REPO_ROOT, compose_config, run_train, start_train

SMOKE = ["debug=smoke", "dataset.trainval_size=120", "dataset.test_size=60"]
LINEAR = [*SMOKE, "trainer.stages=[linear]"]


def _pt_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- checkpoints ---------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": _Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value) and "system" in str(err.value)
    # Through every entry point that reads a checkpoint.
    with pytest.raises(CheckpointError, match=str(bad)):
        train(compose_config([*LINEAR, f"trainer.resume={bad}"], tmp_path / "run"))
    with pytest.raises(CheckpointError, match=str(bad)):
        load_trained(bad)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "foreign"])
def test_corrupt_checkpoint_names_the_file(kind: str, tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.randn(64, 64)}, "config": {}}, good)
    path = tmp_path / "last.pt"
    data = good.read_bytes()
    content = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "garbage": os.urandom(4096),
        "foreign": None,
    }[kind]
    if content is None:
        torch.save([torch.zeros(3)], path)  # a valid torch file, not a bcnn checkpoint
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert "Traceback" not in str(err.value) and len(str(err.value).splitlines()) == 1


def _finished_run(run_dir: Path) -> dict:
    return train(compose_config([*LINEAR, "trainer.cache_features=false"], run_dir))


def test_corrupt_last_checkpoint_resumes_from_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    expected = _finished_run(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    assert previous_path(last).is_file()  # the checkpoint before the final one is kept
    last.write_bytes(last.read_bytes()[:100])  # a crash or full disk truncated it
    (run_dir / "results.json").unlink()
    with caplog.at_level(logging.WARNING, logger="bcnn"):
        resumed = train(compose_config([f"trainer.resume={run_dir}"], run_dir))
    assert "last.prev.pt" in caplog.text and str(last) in caplog.text
    assert resumed["test_acc"] == expected["test_acc"]
    assert json.loads((run_dir / "results.json").read_text())["test_acc"] == expected["test_acc"]


def test_two_unusable_checkpoints_fail_naming_both(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"")
    (folder / "last.prev.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        train(compose_config([f"trainer.resume={tmp_path / 'run'}"], tmp_path / "other"))
    assert "last.pt" in str(err.value) and "last.prev.pt" in str(err.value)


KILL_SCRIPT = """
import os, signal, sys, torch
from bcnn.engine import checkpoint as C
path = sys.argv[1]
def state(step, w):
    return {{"model": {{"w": w}}, "config": {{}}, "stage_index": 0, "next_epoch": step,
            "history": [], "rng": C.rng_state(), "step": step}}
C.save_checkpoint(state(1, torch.ones(3)), path)
{patch}
C.save_checkpoint(state(2, torch.zeros(3)), path)
"""
KILLS = {
    # SIGKILL in the middle of writing the new file.
    "during_write": (
        "def dying(obj, f):\n"
        "    f.write(b'PK' * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = dying"
    ),
    # SIGKILL after the old file became last.prev.pt, before the new one is renamed.
    "between_renames": (
        "real = os.replace\ncalls = []\n"
        "def dying(a, b):\n"
        "    calls.append(a)\n"
        "    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(a, b)\n"
        "os.replace = dying"
    ),
}


@pytest.mark.parametrize("moment", sorted(KILLS))
def test_kill_during_a_checkpoint_write_keeps_a_resumable_one(moment: str, tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    code = KILL_SCRIPT.format(patch=KILLS[moment])
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=REPO_ROOT, capture_output=True, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-1000:]
    assert any(p.endswith(".tmp") for p in _pt_files(path.parent))  # what the kill left
    used, ckpt = load_resumable(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert used == (path if moment == "during_write" else previous_path(path))
    assert not any(p.endswith(".tmp") for p in _pt_files(path.parent))  # cleaned up


def test_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)

    def full(obj, f):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert _pt_files(tmp_path) == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


class _NearlyFullDisk(io.RawIOBase):
    """The file ``os.fdopen`` gives on a disk with ``room`` bytes left: a write beyond
    fails with ENOSPC, which torch.save reports as "unexpected pos ..." (its RuntimeError)."""

    def __init__(self, fd: int, room: int) -> None:
        os.close(fd)
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return size


@pytest.mark.parametrize("save", [save_checkpoint, save_atomic])
def test_a_checkpoint_on_a_full_disk_says_so_and_keeps_the_previous_ones(
    save, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(8)}}, path)
    save_checkpoint({"model": {"w": torch.full((8,), 2.0)}}, path)
    new = {"model": {"w": torch.zeros(64, 64)}}
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: _NearlyFullDisk(fd, 2000))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 3000, 3000))
    with pytest.raises(OSError) as err:
        save(new, path)
    monkeypatch.undo()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and "unexpected pos" not in message
    buffer = io.BytesIO()
    torch.save(new, buffer)
    needed = cache.human_bytes(buffer.tell())  # 16.0 KiB of weights, and the archive
    assert "disk is full" in message and str(path) in message and str(path.parent) in message
    assert (
        f"needs {needed}" in message and "2.9 KiB free" in message and "trainer.resume" in message
    )
    assert _pt_files(path.parent) == ["last.prev.pt", "last.pt"]  # no temporary file left
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((8,), 2.0))
    assert torch.equal(load_checkpoint(previous_path(path))["model"]["w"], torch.ones(8))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("random", "is not a checkpoint (torch.save writes zip archives"),
        ("zip", "is not a checkpoint (a zip archive that torch.save did not write)"),
        ("torchscript", "is not a checkpoint but a TorchScript model"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named_as_such(
    kind: str, expected: str, tmp_path: Path
) -> None:
    path = tmp_path / "last.pt"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("notes/readme.txt", "not a checkpoint")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.load's note that it dispatches to torch.jit
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path} {expected}")
    assert "never holds" not in str(err.value) and len(str(err.value).splitlines()) == 1


def test_kill_between_last_and_best_leaves_a_resumable_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"

    def killed(*args):
        raise KeyboardInterrupt  # stands for a kill right after last.pt was written

    monkeypatch.setattr(stage_module, "link_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train(compose_config(LINEAR, run_dir))
    monkeypatch.undo()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert not (run_dir / "checkpoints" / "best.pt").exists()
    resumed = train(compose_config([f"trainer.resume={run_dir}"], run_dir))
    assert 0 <= resumed["test_acc"] <= 100 and (run_dir / "checkpoints" / "best.pt").is_file()


# ---- divergence ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "suspects"),
    [
        (["normalization=sqrt_l2"], ["normalization.sqrt.eps=", "normalization.sqrt.iters=5"]),
        (["pooling=democratic"], ["pooling.tau=", "pooling.gamma=", "pooling.iters="]),
    ],
    ids=["matrix_sqrt", "democratic"],
)
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    model: list[str], suspects: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = stage_module.train_one_epoch
    calls = []

    def poisoned(net, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second epoch starts from NaN weights
            with torch.no_grad():
                getattr(net, "module", net).classifier.weight.fill_(math.nan)
        return real(net, *args, **kwargs)

    monkeypatch.setattr(stage_module, "train_one_epoch", poisoned)
    run_dir = tmp_path / "run"
    overrides = [*LINEAR, *model, "trainer.linear.epochs=3"]
    with pytest.raises(DivergenceError) as err:
        train(compose_config(overrides, run_dir))
    message = str(err.value)
    parts = ("linear stage", "epoch 2/3", "step 1", "trainer.linear.lr=", *suspects)
    for part in parts:
        assert part in message, message
    assert not (run_dir / "results.json").exists()
    kept = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert kept["next_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert len((run_dir / "metrics.csv").read_text().strip().splitlines()) == 2  # header + 1


def test_divergence_names_the_backbone_setting_that_caused_it(tmp_path: Path) -> None:
    # VGG-M's LRN with kappa = alpha = 0 divides by zero: the backbone names its setting.
    overrides = [*LINEAR, "backbone=vgg_m", "backbone.lrn=[5,0,0,0.75]"]
    with pytest.raises(DivergenceError, match=r"backbone\.lrn=\[5, 0, 0, 0\.75\]"):
        train(compose_config(overrides, tmp_path / "run"))


def test_learning_rate_divergence_fails_with_one_message(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"epoch 1/2, step \d+.*trainer\.linear\.lr=1e\+38"):
        train(compose_config([*LINEAR, "trainer.linear.lr=1e38"], run_dir))
    # Nothing to resume and no result: the directory stays free for the next attempt.
    assert not any((run_dir / n).exists() for n in ("results.json", "config.yaml", "checkpoints"))


def _toy_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.rand(4, 3, 2, 2, generator=gen), torch.randint(3, (4,), generator=gen))
        for _ in range(n)
    ]


def test_fp16_skipped_steps_are_not_divergence() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    calls = []

    def first_gradient_infinite(grad: torch.Tensor) -> torch.Tensor:
        # An infinite gradient of a finite loss: the scaler skips this step and halves its
        # scale; training goes on.
        calls.append(1)
        return grad * math.inf if len(calls) == 1 else grad

    model[1].weight.register_hook(first_gradient_infinite)
    before = model[1].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    stats = train_one_epoch(
        model, _toy_batches(5), optimizer, torch.device("cpu"), scaler=scaler, precision="fp16"
    )
    assert not stats.diverged and math.isfinite(stats.loss)
    assert scaler.get_scale() == 65536.0 / 2
    assert torch.isfinite(model[1].weight).all() and not torch.equal(model[1].weight, before)


def test_non_finite_loss_is_found_within_check_every_steps() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = _toy_batches(10)
    batches[2] = (torch.full_like(batches[2][0], math.nan), batches[2][1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, batches, optimizer, torch.device("cpu"), check_every=3)
    assert stats.diverged and stats.first_nonfinite_step == 2
    assert stats.seen == 3 * 4  # the epoch stopped at the check after step 3


# ---- feature cache -------------------------------------------------------------------------
def test_human_readable_sizes() -> None:
    assert cache.human_bytes(512) == "512 B"
    assert cache.human_bytes(1536) == "1.5 KiB"
    assert cache.human_bytes(5 * 2**20) == "5.0 MiB"
    assert cache.human_bytes(3 * 2**30) == "3.0 GiB"


@pytest.mark.parametrize("where", ["reservation", "write"])
def test_full_disk_is_an_error_naming_folder_and_sizes(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "reservation":
        monkeypatch.setattr(cache.os, "posix_fallocate", no_space)
    else:
        monkeypatch.setattr(cache.os, "pwrite", no_space)
    folder = tmp_path / "cache"
    overrides = [*LINEAR, "trainer.cache_features=true", f"trainer.cache_dir={folder}"]
    with pytest.raises(OSError) as err:
        train(compose_config(overrides, tmp_path / "run"))
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert str(folder) in message and "free" in message
    assert any(unit in message for unit in ("KiB", "MiB")) and "0.00 GiB" not in message
    # No partial cache is left behind (only the lock files).
    assert [p.name for p in folder.iterdir() if p.suffix != ".lock"] == []


@pytest.mark.parametrize(
    "backbone",
    [["backbone.batch_norm=true"], ["backbone=timm", "backbone.name=resnet18", "pooling=avg"]],
    ids=["small_bn", "timm_resnet18"],
)
def test_cache_works_for_backbones_with_batch_norm(backbone: list[str], tmp_path: Path) -> None:
    cfg = compose_config([*LINEAR, *backbone, "trainer.cache_features=true"], tmp_path)
    model = build_model(cfg, 3)
    # Every tensor enters the key, 0-dim buffers (num_batches_tracked) included.
    key = cache.cache_key(model, {"x": 1})
    counter = next(b for n, b in model.named_buffers() if n.endswith("num_batches_tracked"))
    counter += 1
    assert cache.cache_key(model, {"x": 1}) != key
    results = train(cfg)
    assert 0 <= results["test_acc"] <= 100


def test_smoke_run_caches_only_the_images_it_uses(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    overrides = [*LINEAR, "trainer.cache_features=true", f"trainer.cache_dir={folder}"]
    train(compose_config(overrides, tmp_path / "run"))
    rows = sorted(np.load(f, mmap_mode="r").shape[0] for f in folder.glob("*/features.npy"))
    # debug=smoke: 3 training batches of 8, 2 evaluation batches of 8 (val and test).
    assert rows == [16, 16, 24]
    metas = [json.loads(p.read_text()) for p in folder.glob("*/meta.json")]
    assert sorted(m["images"] for m in metas) == [16, 16, 24]


class _GatedImages(Dataset):
    """Images that wait for a gate: holds a cache write open while another run arrives."""

    def __init__(self, gate: threading.Event, entered: threading.Event) -> None:
        self.gate, self.entered, self.reads = gate, entered, 0

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.entered.set()
        assert self.gate.wait(60)
        self.reads += 1
        return torch.full((3, 16, 16), i, dtype=torch.uint8), i % 3


class _Flag(logging.Handler):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_two_runs_sharing_a_cache_key_compute_it_once(tmp_path: Path) -> None:
    model = build_model(compose_config(["backbone.channels=[4]"], tmp_path), 3).eval()
    gate, entered = threading.Event(), threading.Event()
    data = _GatedImages(gate, entered)
    results: dict[str, tuple] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            results[name] = cache.build_cache(
                model, data, tmp_path / "shared", {"split": "train"}, views=1, dtype="float32",
                batch_size=4, device=torch.device("cpu"), precision="32", num_workers=0,
                env=D.DistEnv(),
            )  # fmt: skip
        except BaseException as err:  # surfaced below
            errors.append(err)

    waiting = _Flag("Another run is writing")
    logging.getLogger("bcnn.engine.cache").addHandler(waiting)
    try:
        first = threading.Thread(target=run, args=("first",))
        first.start()
        assert entered.wait(60)  # the first run holds the lock and is computing
        second = threading.Thread(target=run, args=("second",))
        second.start()
        assert waiting.seen.wait(60)  # the second one waits for it
        gate.set()
        first.join(60)
        second.join(60)
    finally:
        gate.set()
        logging.getLogger("bcnn.engine.cache").removeHandler(waiting)
    assert not errors, errors
    assert data.reads == len(data)  # computed once, reused by the second run
    np.testing.assert_array_equal(results["first"][0], results["second"][0])
    names = [p.name for p in (tmp_path / "shared").iterdir()]
    assert len([n for n in names if not n.startswith(".")]) == 1
    assert not any(n.endswith(".partial") for n in names)


@pytest.mark.slow
def test_concurrent_runs_on_one_cache_directory_both_succeed(tmp_path: Path) -> None:
    shared = tmp_path / "cache"
    common = [*LINEAR, "trainer.cache_features=true", f"trainer.cache_dir={shared}"]
    procs = [start_train([*common, f"hydra.run.dir={tmp_path / name}"]) for name in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    logs = "".join((tmp_path / n / "train.log").read_text() for n in ("a", "b"))
    # Three splits: computed once each, reused once each.
    assert logs.count("Caching ") == 3 and logs.count("Reusing the feature cache") == 3
    results = [json.loads((tmp_path / n / "results.json").read_text()) for n in ("a", "b")]
    assert results[0]["test_acc"] == results[1]["test_acc"]


# ---- run directories -----------------------------------------------------------------------
def _files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_checkpoint_only_resumes_the_run_that_wrote_it(tmp_path: Path) -> None:
    runs = {name: tmp_path / name for name in ("avg", "sum")}
    for pooling, run_dir in runs.items():
        train(compose_config([*LINEAR, f"pooling={pooling}"], run_dir))
    foreign = runs["avg"] / "checkpoints" / "last.pt"
    mine = runs["sum"] / "checkpoints" / "last.pt"
    mine.write_bytes(foreign.read_bytes())  # a checkpoint of another run, copied in
    before = _files(runs["sum"])
    with pytest.raises(CheckpointError) as err:
        train(compose_config([f"trainer.resume={runs['sum']}"], runs["sum"]))
    message = str(err.value)
    ids = [(d / "run_id.txt").read_text() for d in runs.values()]
    assert all(i in message for i in ids) and str(runs["avg"]) in message, message
    assert str(mine) in message and len(message.splitlines()) == 1
    assert _files(runs["sum"]) == before  # nothing of the other run written


@pytest.mark.slow
def test_a_refused_start_writes_nothing_into_the_run_directory(tmp_path: Path) -> None:
    """The moment two runs race for: the directory is taken after train.py looked, before
    Hydra writes its record and log; the late run leaves no file there."""
    run_dir = tmp_path / "run"
    _finished_run(run_dir)
    before = _files(run_dir)
    script = tmp_path / "late_start.py"
    script.write_text(
        "import hydra, bcnn.config; from bcnn.engine import trainer; "
        "hydra.main(version_base='1.3', config_path='pkg://bcnn.configs', "
        "config_name='train')(trainer.train)()\n"
    )
    proc = run_train(
        [*LINEAR, "seed=2", f"hydra.run.dir={run_dir}"], script=[sys.executable, str(script)]
    )
    assert proc.returncode != 0
    assert "already holds a run" in proc.stderr and f"trainer.resume={run_dir}" in proc.stderr
    assert _files(run_dir) == before and not (run_dir / ".hydra").exists()


def test_fresh_run_refuses_a_directory_holding_a_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _finished_run(run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(RunDirectoryError, match=rf"trainer\.resume={run_dir}"):
        train(compose_config(LINEAR, run_dir))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_two_runs_into_one_directory_at_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    procs = [start_train([*LINEAR, f"seed={seed}", f"hydra.run.dir={run_dir}"]) for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, [o[1][-1500:] for o in outs]
    refused = next(o[1] for p, o in zip(procs, outs) if p.returncode != 0)
    assert "already holds a run" in refused and f"trainer.resume={run_dir}" in refused
    rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # header + the two epochs of one run
    assert json.loads((run_dir / "results.json").read_text())["stages"].keys() == {"linear"}
    # Hydra's record is the winner's too.
    seed = OmegaConf.load(run_dir / "config.yaml").seed
    assert f"seed={seed}" in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").seed == seed


def test_runs_and_sweeps_composed_in_one_second_get_distinct_directories() -> None:
    dirs = []
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        for _ in range(2):
            cfg = compose("train", return_hydra_config=True)
            run, sweep = str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)
            assert run.rsplit("_", 1)[1] == sweep.rsplit("_", 1)[1]  # one id per config
            dirs.append((run, sweep))
    assert dirs[0][0] != dirs[1][0] and dirs[0][1] != dirs[1][1]


@pytest.mark.slow
def test_diverged_cli_run_exits_with_one_message(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(
        [*LINEAR, "trainer.linear.lr=1e38", f"hydra.run.dir={run_dir}"], full_error=False
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "bcnn-train: error: Training diverged" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "results.json").exists()
