"""scripts/bench_gpu.py (`make bench-gpu`): the quick CPU run, its guards and its checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import benchlib as bench
import pytest

from tests.conftest import REPO_ROOT, load_script, run_train


def _load_script():
    return load_script("bench_gpu")


bench_gpu = _load_script()


def test_make_bench_gpu_runs_the_script_with_its_arguments() -> None:
    if not shutil.which("make"):  # pragma: no cover  (make is there wherever `make test` runs)
        pytest.skip("no make")
    args = "--device cpu --quick --out results"
    command = ["make", "-s", "-n", "bench-gpu", "BENCH_PYTHON=python9", f"ARGS={args}"]
    dry = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert dry.stdout.strip() == f"python9 scripts/bench_gpu.py {args}"


@pytest.mark.slow
def test_bench_gpu_quick_runs_every_part_and_checks_every_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each part forked from a warm interpreter (tests/_warm.py) rather than started anew;
    # run_part itself, its process group and timeout, is the test below.
    def warm_part(command: list[str], timeout_s: float, label: str) -> tuple[str, list[str]]:
        proc = run_train([], timeout=timeout_s, script=command)
        code = proc.returncode
        tail = (proc.stdout + proc.stderr).splitlines()[-40:]
        return ("ok" if code == 0 else f"failed (exit code {code})"), tail

    monkeypatch.setattr(bench_gpu, "run_part", warm_part)
    args = f"--device cpu --quick --out {tmp_path}"
    code = bench_gpu.main(args.split())
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    for part in bench_gpu.PARTS:
        assert f"== {part.name}: ok in" in out
    files = [
        "training_cpu.csv", "training_cpu_cache.csv", "training_cpu.md", "model_heads_cpu.csv",
        "model_heads_cpu.md", "small_side_cpu.csv", "small_side_cpu.md",
        "matrix_functions_cpu.csv", "matrix_functions_cpu.md",
    ]  # fmt: skip
    for name in files:
        assert (tmp_path / name).stat().st_size > 0, name
        if name.endswith(".md"):
            text = (tmp_path / name).read_text()
            assert "- device: " in text and "- date: " in text, name
            assert "- command: `python scripts/bench_" in text and "--deadline-s" in text, name
    # The small-side part timed the three matrix functions of both routes.
    _, small = bench.read_csv(tmp_path / "small_side_cpu.csv")
    assert {"dxd_eigh", "small_ns5", "small_pow", "dxd_log"} <= {r["route"] for r in small}
    meta, checks = bench.read_csv(tmp_path / "bench_gpu_cpu.csv")
    assert meta["command"] == f"python scripts/bench_gpu.py {args}"
    expected = sum(len(fn(tmp_path, "cpu")) for fn in bench_gpu.CHECKS.values())
    assert len(checks) == expected == 13
    assert {c["part"] for c in checks} == set(bench_gpu.CHECKS)
    # Quick shapes are not the targets' shapes: those targets say so instead of a verdict.
    mfu = next(c for c in checks if "MFU" in c["target"])
    assert mfu["value"] == "not measured" and mfu["met"] == ""
    readme = (tmp_path / "README.md").read_text()
    for section in ("## GPU targets", "## Training throughput", "## Model heads"):
        assert section in readme


def test_a_hanging_part_is_killed_at_its_timeout() -> None:
    code = "import time; print('started', flush=True); time.sleep(120)"
    status, tail = bench_gpu.run_part([sys.executable, "-c", code], timeout_s=3, label="hang")
    assert status == "timed out after 3 s (killed)"
    assert tail == ["started"]
    status, _ = bench_gpu.run_part([sys.executable, "-c", "raise SystemExit(3)"], 30, "fail")
    assert status == "failed (exit code 3)"


def test_missing_packages_fail_early_with_the_wheels_to_bring(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(bench_gpu.REQUIRED, "no_such_module_xyz", "no-such-dist")
    assert bench_gpu.missing_packages() == ["no-such-dist"]
    assert bench_gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing packages: no-such-dist" in err and "pip download" in err
    assert "docs/benchmarks.md" in err
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_cpu_without_quick_is_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        bench_gpu.parse_args(["--device", "cpu"])
    assert exc.value.code == 2


class _Clock:
    """A fake ``time`` module whose clock only advances when a part "runs"."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def test_parts_stay_within_the_total_even_when_each_runs_until_killed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clock, runs = _Clock(), {}

    def killed_at_timeout(command: list[str], timeout_s: float, label: str) -> tuple[str, list]:
        runs[label] = (timeout_s, float(command[command.index("--deadline-s") + 1]))
        clock.now += timeout_s
        return "timed out", []

    monkeypatch.setattr(bench_gpu, "time", clock)
    monkeypatch.setattr(bench_gpu, "run_part", killed_at_timeout)
    budgets = {part.name: part.budget_s for part in bench_gpu.PARTS}
    # The nominal budgets fit in 8 minutes with the start and the report.
    assert sum(budgets.values()) + len(budgets) * bench_gpu.GRACE_S <= bench_gpu.TOTAL_S < 480

    args = bench_gpu.parse_args(["--out", str(tmp_path)])
    bench_gpu.run_parts(args, "cuda")
    assert clock.now <= bench_gpu.TOTAL_S
    for name, (timeout, soft) in runs.items():
        assert timeout == budgets[name] + bench_gpu.GRACE_S
        assert soft == pytest.approx(budgets[name], abs=0.5)

    # A shorter total: later parts get less, none is started without time to finish.
    clock.now, runs = 0.0, {}
    args = bench_gpu.parse_args(["--out", str(tmp_path), "--total-s", "200"])
    outcomes = bench_gpu.run_parts(args, "cuda")
    assert clock.now <= 200
    assert runs["training"][0] == 200 - 0.5 * (
        budgets["heads"] + budgets["small_side"] + budgets["matrix"]
    )
    assert all(timeout >= bench_gpu.GRACE_S + 5 for timeout, _ in runs.values())
    assert len(outcomes) == 4


def _write(path: Path, rows: list[dict], meta: dict | None = None) -> None:
    bench.write_csv(path, rows, meta=meta)


def test_checks_read_the_targets_from_the_result_files(tmp_path: Path) -> None:
    meta = {"backbone": "vgg_d", "batch": 32, "size": 448}
    heads = [{"head": "spectral", "head_share_pct": 4.2}, {"head": "sum", "head_share_pct": 2.5}]
    _write(tmp_path / "model_heads_gpu.csv", heads, meta)
    spectral, total = bench_gpu.heads_checks(tmp_path, "cuda")
    assert (spectral.value, spectral.met) == ("4.2%", "yes")
    assert (total.value, total.met) == ("2.5%", "no")
    # Another setting (batch 2) is not the target's: not measured.
    _write(tmp_path / "model_heads_gpu.csv", heads, {**meta, "batch": 2})
    assert bench_gpu.heads_checks(tmp_path, "cuda")[0].value == "not measured"

    common = {"dtype": "float32", "d": 512, "batch": 32}
    matrix = [
        {**common, "method": "newton_schulz", "backward": "lyapunov_iterative", "iters": 5,
         "fwdbwd_ms": 10.0, "peak_fwd_mb": 100.0, "peak_fwdbwd_mb": 110.0},
        {**common, "method": "svd", "backward": "svd", "iters": 0, "fwdbwd_ms": 250.0},
        {**common, "method": "eigh", "backward": "lyapunov_eig", "iters": 0, "fwdbwd_ms": 40.0},
        {**common, "method": "matmul_floor", "backward": "lyapunov_iterative", "iters": 5,
         "fwdbwd_ms": 8.0},
        {**common, "method": "auto", "backward": "auto", "iters": 5, "fwdbwd_ms": 10.5},
    ]  # fmt: skip
    _write(tmp_path / "matrix_functions_cuda.csv", matrix)
    svd, eigh, floor, memory, auto = bench_gpu.matrix_checks(tmp_path, "cuda")
    assert (svd.value, svd.met) == ("25.00x", "yes")
    assert (eigh.value, eigh.met) == ("4.00x", "no")
    assert (floor.value, floor.met) == ("1.25x", "yes")
    assert (memory.value, memory.met) == ("1.10x", "yes")
    assert (auto.value, auto.met) == ("1.05x", "yes")

    small = [
        {"n": 196, "d": 512, "route": "dxd_eigh", "time_ms": 30.0, "rule_small_side": True},
        {"n": 196, "d": 512, "route": "small_eigh", "time_ms": 12.0, "rule_small_side": True},
        {"n": 196, "d": 512, "route": "dxd_ns5", "time_ms": 5.0, "rule_small_side": True},
        {"n": 196, "d": 512, "route": "small_ns5", "time_ms": 6.0, "rule_small_side": True},
    ]
    _write(tmp_path / "small_side_cuda.csv", small)
    at_512, at_1920, rule = bench_gpu.small_side_checks(tmp_path, "cuda")
    assert (at_512.value, at_512.met) == ("2.5x", "no")
    assert at_1920.value == "not measured"
    assert (rule.value, rule.met) == ("(196, 512) small_ns5", "no")
