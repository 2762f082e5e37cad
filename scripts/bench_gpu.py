"""Every GPU figure of benchmarks/results/README.md in one command, in under 8 minutes.

``make bench-gpu`` runs this script. On one H100 or H200 it runs four parts, each a
benchmark script in its own process with a time budget (a soft deadline the part honours
between units of work, and a hard timeout 15 s later that kills it, so that nothing hangs;
all within ``--total-s``, 465 s by default):

========== ======================================================== =========
part       what (script)                                            budget
========== ======================================================== =========
training   VGG-D B-CNN at 448, bf16, batch 32: throughput, MFU,       80 s
           head share; the cached linear stage (bench_training.py)
heads      head shares of a training step, VGG-D at 448, batch 32    100 s
           (bench_model.py)
small_side small-side route of bcnn.ops (``sqrtm_from_features``,    90 s
           ``powm_``/``logm_from_features``) vs the d x d route at
           (n, d) = (196, 512), (196, 768), (196, 1920), (784, 512)
           (bench_small_side.py)
matrix     matrix square root routes and the ``auto`` table, d = 64  135 s
           to 1024 (bench_matrix_functions.py; d = 512, batch 32
           first)
========== ======================================================== =========

Each part writes its own result files (device, date and command inside) into ``--out``;
this script then checks every target against them and writes ``bench_gpu_<device>.csv``
and ``.md`` and the "GPU targets" section of ``<out>/README.md``.

``--device cpu --quick`` runs the same parts on tiny shapes in seconds (the test suite
does), writing to ``outputs/bench_gpu_quick`` unless ``--out`` says otherwise.

Only the standard library is imported before the check for missing packages, which names
the wheels to bring (docs/benchmarks.md).

Usage:
    make bench-gpu
    make bench-gpu ARGS="--device cpu --quick"
    python scripts/bench_gpu.py --parts heads training --out /tmp/results
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in main(), after the check for missing packages
    from benchlib import RunInfo

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"
# import name -> distribution: what the parts import (torch, torchvision and timm with
# their own dependencies; Hydra for the configs). matplotlib is optional (a plot).
REQUIRED = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "numpy": "numpy",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime",
}
TOTAL_S = 465.0  # under 8 minutes, with room for this script's own start and report
GRACE_S = 15.0  # hard timeout = budget + this: the unit running at the soft deadline, the report


@dataclass(frozen=True)
class Part:
    """One benchmark script run by this one.

    Attributes:
        name: Short name (``--parts``).
        script: File in scripts/.
        budget_s: Seconds it may take on the GPU (its soft deadline is this minus start-up).
        gpu: Arguments on the GPU.
        quick: Arguments for ``--quick`` (tiny shapes on any device).
        out_flag: ``dir``: ``--out`` takes the results folder; ``prefix``: a file prefix.
        stem: File name (prefix) of its results, ``{dev}`` replaced by the device's tag.
    """

    name: str
    script: str
    budget_s: float
    gpu: tuple[str, ...]
    quick: tuple[str, ...]
    out_flag: str
    stem: str


PARTS = (
    Part(
        "training",
        "bench_training.py",
        80.0,
        ("--precision", "bf16", "--batch", "32", "--size", "448", "--channels-last",
         "--models", "vgg_d_bcnn", "vgg_d_sqrt", "--steps", "10", "--warmup", "3",
         "--cache-model", "vgg_d_bcnn", "--cache-images", "512", "--cache-size", "448"),
        ("--precision", "bf16", "--batch", "4", "--size", "32", "--models", "small_bcnn",
         "--steps", "1", "--warmup", "1", "--cache-model", "small_bcnn", "--cache-images", "16",
         "--cache-size", "32"),
        "dir",
        "training_{dev}",
    ),
    Part(
        "heads",
        "bench_model.py",
        100.0,
        ("--batch", "32", "--size", "448", "--repeats", "10", "--fwd-repeats", "3",
         "--head-repeats", "10"),
        ("--backbone", "small", "--batch", "2", "--size", "32", "--repeats", "1",
         "--head-repeats", "1", "--heads", "avg", "sum", "sqrt_ns", "spectral"),
        "dir",
        "model_heads_{tag}",
    ),
    Part(
        "small_side",
        "bench_small_side.py",
        90.0,
        ("--functions", "sqrt", "power", "log", "--batch", "32", "--repeats", "5",
         "--budget-s", "1.0", "--shapes", "196x512", "196x1920", "784x512", "196x768",
         "196x384", "196x256", "392x512"),
        ("--quick", "--functions", "sqrt", "power", "log"),
        "prefix",
        "small_side_{dev}",
    ),
    Part(
        "matrix",
        "bench_matrix_functions.py",
        135.0,
        ("--repeats", "10", "--budget-s", "0.25"),
        ("--dims", "8", "16", "--batches", "2", "--dtypes", "float32", "float64", "--iters",
         "0", "1", "5", "--repeats", "1", "--budget-s", "0.001"),
        "prefix",
        "matrix_functions_{dev}",
    ),
)  # fmt: skip


def missing_packages() -> list[str]:
    """The distributions of :data:`REQUIRED` whose modules cannot be imported."""
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu with --quick")
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks the code paths")
    names = [part.name for part in PARTS]
    p.add_argument("--parts", nargs="+", default=names, choices=names, help="parts to run")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results; outputs/bench_gpu_quick with --quick)",
    )
    p.add_argument(
        "--total-s",
        type=float,
        default=TOTAL_S,
        help=f"time limit of the whole run (default {TOTAL_S:g} s); each part gets its budget "
        "or what is left",
    )
    args = p.parse_args(argv)
    if args.device.startswith("cpu") and not args.quick:
        p.error(
            "--device cpu runs the GPU shapes on the CPU (hours): add --quick to check the code "
            "paths on tiny shapes, or run the individual scripts for CPU figures"
        )
    if args.out is None:
        args.out = REPO_ROOT / ("outputs/bench_gpu_quick" if args.quick else "benchmarks/results")
    args.out = args.out.resolve()  # the parts run from the repository root
    return args


# ----------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """How one part ended."""

    part: str
    status: str  # ok, failed (exit code N), timed out after N s, skipped (...)
    seconds: float = 0.0
    command: str = ""
    tail: list[str] = field(default_factory=list)


def part_command(part: Part, args: argparse.Namespace, device: str, soft_s: float) -> list[str]:
    """The command line of ``part`` (run from the repository root)."""
    tags = {"dev": device, "tag": "cpu" if device == "cpu" else "gpu"}
    out = args.out if part.out_flag == "dir" else args.out / part.stem.format(**tags)
    if out.is_relative_to(REPO_ROOT):  # the results files quote a command that runs anywhere
        out = out.relative_to(REPO_ROOT)
    extra = part.quick if args.quick else part.gpu
    return [
        sys.executable, str(Path("scripts") / part.script), "--device", args.device, *extra,
        "--deadline-s", f"{max(soft_s, 1.0):.0f}", "--out", str(out),
    ]  # fmt: skip


def run_part(command: list[str], timeout_s: float, label: str) -> tuple[str, list[str]]:
    """Runs ``command``, echoing its output with a ``[label]`` prefix; kills it at the timeout.

    Returns:
        The status and the last 40 lines of output.
    """
    env = dict(os.environ)
    # The parts import the bcnn beside them, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills its children too
    )

    def echo() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(f"[{label}] {line}", end="", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=5)
        return f"timed out after {timeout_s:.0f} s (killed)", list(tail)
    except BaseException:  # Ctrl-C: the part runs in its own session, stop it too
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    reader.join(timeout=5)
    return ("ok" if code == 0 else f"failed (exit code {code})"), list(tail)


def run_parts(args: argparse.Namespace, device: str) -> list[Outcome]:
    """Runs the chosen parts in order, all of them within ``--total-s`` even if each one runs
    until it is killed.

    A part's hard timeout is its budget plus :data:`GRACE_S`, or less where the time left,
    minus half the budgets of the parts after it, is shorter; its soft deadline is the
    timeout minus :data:`GRACE_S`.
    """
    start = time.monotonic()
    chosen = [part for part in PARTS if part.name in args.parts]
    outcomes = []
    for i, part in enumerate(chosen):
        left = args.total_s - (time.monotonic() - start)
        reserve = sum(0.5 * later.budget_s for later in chosen[i + 1 :])
        timeout = min(part.budget_s + GRACE_S, left - reserve)
        if timeout < GRACE_S + 5:
            outcomes.append(Outcome(part.name, f"skipped ({left:.0f} s left of --total-s)"))
            continue
        command = part_command(part, args, device, soft_s=timeout - GRACE_S)
        print(f"== {part.name}: {timeout:.0f} s at most: {' '.join(command[1:])}", flush=True)
        began = time.monotonic()
        status, tail = run_part(command, timeout, part.name)
        seconds = time.monotonic() - began
        shown = " ".join(["python", *command[1:]])
        outcomes.append(Outcome(part.name, status, seconds, shown, tail))
        print(f"== {part.name}: {status} in {seconds:.0f} s", flush=True)
    return outcomes


# ----------------------------------------------------------------------------- targets


@dataclass
class Check:
    """One target against what its results file says."""

    target: str
    value: str
    met: str  # yes, no, or "" when not measured
    source: str


def _float(row: dict[str, str] | None, key: str) -> float:
    try:
        return float(row[key]) if row else math.nan
    except (KeyError, ValueError):
        return math.nan


def _find(rows: list[dict[str, str]], **want: object) -> dict[str, str] | None:
    return next((r for r in rows if all(r.get(k) == str(v) for k, v in want.items())), None)


def _check(target: str, value: float, ok: bool, unit: str, source: str, digits: int = 2) -> Check:
    if math.isnan(value):
        return Check(target, "not measured", "", source)
    return Check(target, f"{value:.{digits}f}{unit}", "yes" if ok else "no", source)


def _rows(path: Path) -> list[dict[str, str]]:
    import benchlib as bench

    return bench.read_csv(path)[1] if path.exists() else []


def matrix_checks(out: Path, dev: str) -> list[Check]:
    """d = 512, batch 32, float32 ratios and memory; ``auto`` within 1.1x everywhere."""
    source = f"matrix_functions_{dev}.csv"
    rows = _rows(out / source)
    at = {"dtype": "float32", "d": 512, "batch": 32}
    ns = _find(rows, **at, method="newton_schulz", backward="lyapunov_iterative", iters=5)
    svd = _find(rows, **at, method="svd", backward="svd")
    eig = _find(rows, **at, method="eigh", backward="lyapunov_eig")
    floor = _find(rows, **at, method="matmul_floor", iters=5)
    t_ns = _float(ns, "fwdbwd_ms")
    vs_svd, vs_eig = _float(svd, "fwdbwd_ms") / t_ns, _float(eig, "fwdbwd_ms") / t_ns
    to_floor = t_ns / _float(floor, "fwdbwd_ms")
    memory = _float(ns, "peak_fwdbwd_mb") / _float(ns, "peak_fwd_mb")
    at = "d=512, batch 32, float32, NS(5) + lyapunov_iterative fwd+bwd:"
    checks = [
        _check(f"{at} >= 20x faster than svd", vs_svd, vs_svd >= 20, "x", source),
        _check(f"{at} >= 5x faster than eigh", vs_eig, vs_eig >= 5, "x", source),
        _check(f"{at} within 1.5x of the matmul floor", to_floor, to_floor <= 1.5, "x", source),
        _check(f"{at} backward peak memory <= 1.2x forward's", memory, memory <= 1.2, "x", source),
    ]
    worst = math.nan
    for dtype, d, batch in {(r["dtype"], r["d"], r["batch"]) for r in rows}:
        shape = [r for r in rows if (r["dtype"], r["d"], r["batch"]) == (dtype, d, batch)]
        auto = _float(_find(shape, method="auto"), "fwdbwd_ms")
        routes = [
            _float(r, "fwdbwd_ms")
            for r in shape
            if r["method"] in ("newton_schulz", "eigh", "svd")
            and (r["method"] != "newton_schulz" or r["iters"] == "5")
        ]
        if routes and not math.isnan(auto):
            worst = max(auto / min(routes), -math.inf if math.isnan(worst) else worst)
    label = "`auto` within 1.1x of the fastest route at every shape (worst ratio)"
    checks.append(_check(label, worst, worst <= 1.1, "x", source))
    return checks


def small_side_checks(out: Path, dev: str) -> list[Check]:
    """Speed-ups of the small side (issue 16's CPU targets, measured here on the device) and
    the cost rule never choosing a slower route."""
    source = f"small_side_{dev}.csv"
    rows = _rows(out / source)
    checks = []
    for (n, d), target in {(196, 512): 3.0, (196, 1920): 10.0}.items():
        speedup = _float(_find(rows, n=n, d=d, route="dxd_eigh"), "time_ms") / _float(
            _find(rows, n=n, d=d, route="small_eigh"), "time_ms"
        )
        label = f"small side (eigh) at (n, d) = ({n}, {d}), batch 32: >= {target:g}x faster"
        checks.append(_check(label, speedup, speedup >= target, "x", source, 1))
    slower = []
    for r in rows:
        if r["route"].startswith("small_") and r["rule_small_side"] == "True":
            pair = _find(rows, n=r["n"], d=r["d"], route="dxd_" + r["route"].removeprefix("small_"))
            if pair and float(r["time_ms"]) > float(pair["time_ms"]):
                slower.append(f"({r['n']}, {r['d']}) {r['route']}")
    picked = [r for r in rows if r["route"].startswith("small_") and r["rule_small_side"] == "True"]
    value = "not measured" if not picked else ("none" if not slower else ", ".join(slower))
    met = "" if not picked else ("yes" if not slower else "no")
    checks.append(
        Check("cost rule: never picks the small side where it is slower", value, met, source)
    )
    return checks


def heads_checks(out: Path, dev: str) -> list[Check]:
    """Head shares of a training step, VGG-D at 448, batch 32."""
    tag = "cpu" if dev == "cpu" else "gpu"
    source = f"model_heads_{tag}.csv"
    path = out / source
    import benchlib as bench

    meta, rows = bench.read_csv(path) if path.exists() else ({}, [])
    setting = (meta.get("backbone", "vgg_d"), meta.get("batch"), meta.get("size"))
    at_target = setting == ("vgg_d", "32", "448")
    checks = []
    for head, limit in (("spectral", 5.0), ("sum", 2.0)):
        share = _float(_find(rows, head=head), "head_share_pct") if at_target else math.nan
        label = f"VGG-D at 448, batch 32: {head} head <= {limit:g}% of a training step"
        checks.append(_check(label, share, share <= limit, "%", source, 1))
    return checks


def training_checks(out: Path, dev: str) -> list[Check]:
    """MFU and head share of the VGG-D B-CNN in bf16; the cached linear stage."""
    source = f"training_{dev}.csv"
    row = _find(_rows(out / source), model="vgg_d_bcnn", precision="bf16", size=448)
    mfu, share = _float(row, "mfu_pct"), _float(row, "head_share_pct")
    cache_source = f"training_{dev}_cache.csv"
    cache = _find(_rows(out / cache_source), model="vgg_d_bcnn", size=448)
    ratio = _float(cache, "cached_stage_over_one_pass")
    return [
        _check("H100/H200, bf16, VGG-D B-CNN at 448: >= 40% MFU", mfu, mfu >= 40, "%", source, 1),
        _check("the same: head <= 5% of the step", share, share <= 5, "%", source, 1),
        _check("cached linear stage (25 epochs) <= 1.5x one extraction pass", ratio,
               ratio <= 1.5, "x", cache_source),
    ]  # fmt: skip


CHECKS = {
    "training": training_checks,
    "heads": heads_checks,
    "small_side": small_side_checks,
    "matrix": matrix_checks,
}


def targets_section(out: Path, command: str = "make bench-gpu") -> str:
    """The README's "GPU targets" section from ``bench_gpu_cuda.csv`` in ``out`` (if any)."""
    import benchlib as bench

    path = out / "bench_gpu_cuda.csv"
    lines = ["## GPU targets", ""]
    if path.exists():
        meta, rows = bench.read_csv(path)
        lines += [
            f"Measured on {meta['device']} ({meta['date']}) by `{meta['command']}`; details in "
            "[bench_gpu_cuda.md](bench_gpu_cuda.md) and the files it names.",
            "",
        ]
    else:
        rows = [
            vars(check) | {"value": "**not measured**"}
            for checks in CHECKS.values()
            for check in checks(out / "__none__", "cuda")
        ]
        lines += [
            "**No GPU has been available to this project yet: every target below is "
            f"unmeasured.** One command measures them all on one H100 or H200, in under 8 "
            f"minutes: `{command}` (docs/benchmarks.md: what it runs, and how to run it where "
            "only torch, torchvision and timm are installed).",
            "",
        ]
    lines += bench.markdown_table(
        rows, {"target": "target", "value": "measured", "met": "met", "source": "results file"}
    )
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace, info: RunInfo, outcomes: list[Outcome]) -> list[Check]:
    """Writes ``bench_gpu_<device>.csv`` / ``.md`` and the README's "GPU targets" section."""
    import benchlib as bench

    dev = info.device.type
    checks = {name: fn(args.out, dev) for name, fn in CHECKS.items() if name in args.parts}
    rows = [{"part": name, **vars(c)} for name, part in checks.items() for c in part]
    meta = {k: v for k, v in info.meta().items() if k in ("device", "date", "command")}
    bench.write_csv(args.out / f"bench_gpu_{dev}.csv", rows, meta=meta)
    body = [
        "Quick run: tiny shapes, the targets' shapes are not measured." if args.quick else "",
        "",
        "## Parts",
        "",
        *bench.markdown_table(
            [vars(o) for o in outcomes],
            {"part": "part", "status": "status", "seconds": "seconds", "command": "command"},
            {"seconds": ".0f"},
        ),
        "",
        "## Targets",
        "",
        *bench.markdown_table(
            rows, {"target": "target", "value": "measured", "met": "met", "source": "results file"}
        ),
    ]
    for outcome in outcomes:
        if outcome.status != "ok" and outcome.tail:
            body += [
                "",
                f"### {outcome.part}: last lines of output",
                "",
                "```",
                *outcome.tail,
                "```",
            ]
    bench.write_markdown(args.out / f"bench_gpu_{dev}.md", f"GPU benchmark run ({dev})", info, body)
    if dev == "cuda" or args.quick:
        bench.update_readme_section(
            args.out / "README.md", "GPU targets", targets_section(args.out)
        )
    return [check for part_checks in checks.values() for check in part_checks]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_packages()
    if missing:
        print(
            "bench_gpu: missing packages: " + ", ".join(missing) + ". Install them, or without "
            "internet bring their wheels: on a machine with internet, `python -m pip download "
            "--no-deps -d wheels hydra-core==1.3.* 'omegaconf>=2.3,<2.4'` and `python -m pip wheel "
            "--no-deps -w wheels antlr4-python3-runtime==4.9.3`; here, `python -m pip install "
            "--no-index --find-links wheels hydra-core omegaconf antlr4-python3-runtime` "
            "(docs/benchmarks.md lists all of them).",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(REPO_ROOT))  # the checkout's bcnn, installed or not
    import benchlib as bench
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: --device cuda but torch sees no CUDA device "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). On a machine "
              "without a GPU: --device cpu --quick.", file=sys.stderr)  # fmt: skip
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    info = bench.RunInfo.start(__file__, argv, device)
    outcomes = run_parts(args, device.type)
    checks = report(args, info.finish(), outcomes)
    print(f"\nbench_gpu: {info.seconds:.0f} s; results in {args.out}")
    for check in checks:
        print(f"  {check.met or '-':>3}  {check.value:>14}  {check.target}")
    failed = [o for o in outcomes if o.status != "ok"]
    for outcome in failed:
        print(f"  part {outcome.part}: {outcome.status}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
