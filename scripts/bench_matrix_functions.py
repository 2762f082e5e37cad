"""Benchmark the matrix square root routes of ``bcnn.ops.sqrtm`` (BMVC 2017 Table 3 layout).

For every shape (d, batch, dtype) it times forward and forward+backward of Newton-Schulz
with 0/1/5/10/20 iterations under each backward mode, eigh, svd and ``auto``, plus the
matmul floor (the same number of plain batched matmuls as the Newton-Schulz run), measures
the error against a float64 eigh reference on ReLU Gram matrices (A = X^T X / n, X of n=196
locations), bytes saved for backward, and peak memory on CUDA. Writes ``<out>.csv``,
``<out>.md`` and ``<out>.png``.

Example:
    python scripts/bench_matrix_functions.py --device cpu
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.resources
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bcnn.ops import SQRTM_AUTO_TABLE, resolve_sqrtm, sqrtm
from bcnn.ops.sqrtm import lyapunov_iterative_matmuls, newton_schulz_matmuls

BACKWARDS = ("lyapunov_iterative", "lyapunov_eig", "autograd", "svd")
# (method, backward) pairs that compute A^(1/2) at the paper's operating point (5 iterations):
# the set ``auto`` must be within 1.1x of.
AUTO_CANDIDATES = [("newton_schulz", b) for b in BACKWARDS] + [
    ("eigh", "lyapunov_eig"),
    ("eigh", "svd"),
    ("svd", "lyapunov_eig"),
    ("svd", "svd"),
]
TARGET = {"d": 512, "batch": 32, "dtype": "float32"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Row:
    device: str
    dtype: str
    d: int
    batch: int
    method: str
    backward: str
    iters: int
    resolved: str = ""
    fwd_ms: float = math.nan
    fwdbwd_ms: float = math.nan
    fwd_median_ms: float = math.nan
    fwdbwd_median_ms: float = math.nan
    rel_err: float = math.nan
    saved_mb: float = math.nan
    peak_fwd_mb: float = math.nan
    peak_fwdbwd_mb: float = math.nan
    matmuls_fwd: float = math.nan
    matmuls_fwdbwd: float = math.nan
    timed_runs: int = 0
    extra: dict = field(default_factory=dict, repr=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=list(DTYPES))
    p.add_argument("--iters", type=int, nargs="+", default=[0, 1, 5, 10, 20])
    p.add_argument("--repeats", type=int, default=5, help="most timed runs per measurement")
    p.add_argument(
        "--budget-s",
        type=float,
        default=1.0,
        help="stop repeating a measurement once its timed runs add up to this many seconds",
    )
    p.add_argument(
        "--max-work",
        type=float,
        default=32 * 512**3,
        help="skip float32 shapes with batch*d^3 above this (default: 32*512^3)",
    )
    p.add_argument(
        "--max-work-float64",
        type=float,
        default=32 * 256**3,
        help="the same for float64 (default: 32*256^3: d<=256, and d=512 at batch 1)",
    )
    p.add_argument("--locations", type=int, default=196, help="n of the ReLU Gram matrices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, help="default benchmarks/results/matrix_functions_<device>"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: wall time; cpu: process CPU time (use with --threads 1 on a shared CPU)",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--replot",
        action="store_true",
        help="only redraw <out>.png from an existing <out>.csv (no measurement)",
    )
    args = p.parse_args(argv)
    if args.clock == "cpu" and torch.device(args.device).type != "cpu":
        p.error("--clock cpu only makes sense for --device cpu")
    if args.out is None:
        args.out = f"benchmarks/results/matrix_functions_{torch.device(args.device).type}"
    return args


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical cores, torch threads={torch.get_num_threads()}"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float, clock: str
) -> tuple[float, float, int]:
    """Best and median time (ms) of ``fn`` and the number of timed runs.

    ``clock="wall"``: wall time (CUDA synchronized around each run). ``clock="cpu"``: CPU time
    of this process (``time.process_time``): with one torch thread this is the time the work
    itself takes, whatever else runs on a shared machine (wall time then measures the
    scheduler). The first run is discarded as warm-up when it is cheap; an expensive first
    run (after the shape-level warm-up in :func:`warm_up_shape`) is kept, so that slow
    configurations cost one run, not two. The best run is the estimate least disturbed by
    other processes; the median is reported beside it.
    """
    timer = time.process_time if clock == "cpu" else time.perf_counter
    times: list[float] = []
    for i in range(repeats + 1):
        synchronize(device)
        t0 = timer()
        fn()
        synchronize(device)
        elapsed = timer() - t0
        if i == 0 and elapsed < 0.25 * budget_s:
            continue
        times.append(elapsed)
        if sum(times) >= budget_s:
            break
    return min(times) * 1e3, statistics.median(times) * 1e3, len(times)


def saved_megabytes(fn: Callable[[], object]) -> float:
    """Bytes autograd saves for backward while running ``fn`` (a device-independent memory
    measure: on CPU there is no peak-memory counter)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total / 2**20


def peak_megabytes(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        return math.nan
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def relu_gram(batch: int, d: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.relu(torch.randn(batch, n, d, generator=gen, dtype=torch.float64))
    return X.mT @ X / n


def configs(iters: list[int]) -> list[tuple[str, str, int]]:
    out = [("newton_schulz", b, k) for k in iters for b in BACKWARDS]
    out += [("eigh", "lyapunov_eig", 0), ("eigh", "svd", 0)]
    out += [("svd", "lyapunov_eig", 0), ("svd", "svd", 0)]
    out += [("auto", "auto", 5)]
    return out


def warm_up_shape(A: torch.Tensor, G: torch.Tensor) -> None:
    """Run every code path once at this shape (kernels, allocator, LAPACK workspaces)."""
    for method, backward in [("newton_schulz", b) for b in BACKWARDS] + [
        ("eigh", "lyapunov_eig"),
        ("svd", "svd"),
    ]:
        out = sqrtm(A, method=method, iters=2, backward=backward)
        torch.autograd.grad(out, A, G)


def measure_shape(
    args: argparse.Namespace, device: torch.device, dtype_name: str, d: int, batch: int
) -> list[Row]:
    dtype = DTYPES[dtype_name]
    A64 = relu_gram(batch, d, args.locations, args.seed)
    reference = sqrtm(A64, method="eigh")
    ref_norm = torch.linalg.matrix_norm(reference).clamp_min(1e-300)
    A = A64.to(device=device, dtype=dtype).requires_grad_()
    G = torch.randn(A.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    warm_up_shape(A, G)
    rows: list[Row] = []
    common = {"device": device.type, "dtype": dtype_name, "d": d, "batch": batch}

    for method, backward, k in configs(args.iters):

        def forward(method=method, backward=backward, k=k):
            return sqrtm(A, method=method, iters=k, backward=backward)

        def forward_backward(forward=forward):
            return torch.autograd.grad(forward(), A, G)

        with torch.no_grad():
            value = forward().detach().to(torch.float64).cpu()
        err = (torch.linalg.matrix_norm(value - reference) / ref_norm).mean().item()
        resolved = "+".join(resolve_sqrtm(method, backward, device.type, d))
        fwd_ms, fwd_med, n1 = time_call(forward, device, args.repeats, args.budget_s, args.clock)
        fwdbwd_ms, fwdbwd_med, n2 = time_call(
            forward_backward, device, args.repeats, args.budget_s, args.clock
        )
        row = Row(**common, method=method, backward=backward, iters=k, resolved=resolved)
        row.fwd_ms, row.fwdbwd_ms, row.rel_err = fwd_ms, fwdbwd_ms, err
        row.fwd_median_ms, row.fwdbwd_median_ms = fwd_med, fwdbwd_med
        row.saved_mb = saved_megabytes(forward)
        row.peak_fwd_mb = peak_megabytes(forward, device)
        row.peak_fwdbwd_mb = peak_megabytes(forward_backward, device)
        if method == "newton_schulz":
            row.matmuls_fwd = newton_schulz_matmuls(k)
            if backward == "lyapunov_iterative":
                row.matmuls_fwdbwd = row.matmuls_fwd + lyapunov_iterative_matmuls(k)
        row.timed_runs = min(n1, n2)
        rows.append(row)
        print(
            f"  {method:>13} {backward:>18} k={k:<2} fwd {fwd_ms:9.2f} ms  "
            f"fwd+bwd {fwdbwd_ms:9.2f} ms  err {err:.2e}",
            flush=True,
        )

    # The floor: as many plain batched matmuls as Newton-Schulz (+ iterative backward) uses.
    M = A.detach().clone()
    for k in args.iters:
        n_fwd = newton_schulz_matmuls(k)
        n_all = n_fwd + lyapunov_iterative_matmuls(k)

        def chain(n: int) -> None:
            for _ in range(n):
                torch.matmul(M, M)

        row = Row(**common, method="matmul_floor", backward="lyapunov_iterative", iters=k)
        row.fwd_ms, row.fwd_median_ms, n1 = time_call(
            lambda n=n_fwd: chain(n), device, args.repeats, args.budget_s, args.clock
        )
        row.fwdbwd_ms, row.fwdbwd_median_ms, n2 = time_call(
            lambda n=n_all: chain(n), device, args.repeats, args.budget_s, args.clock
        )
        row.matmuls_fwd, row.matmuls_fwdbwd, row.timed_runs = n_fwd, n_all, min(n1, n2)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- reporting


def published_timings() -> list[dict[str, str]]:
    """The published timings shipped with the package (bcnn/resources)."""
    path = importlib.resources.files("bcnn").joinpath("resources/matrix_sqrt_timings.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def find(rows: list[Row], **kw) -> Row | None:
    return next((r for r in rows if all(getattr(r, k) == v for k, v in kw.items())), None)


def fmt(x: float, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def target_summary(rows: list[Row], device: torch.device) -> list[str]:
    shape = TARGET
    lines = [
        f"## Targets (d={shape['d']}, batch {shape['batch']}, {shape['dtype']}, forward+backward)",
        "",
    ]
    sel = {k: v for k, v in shape.items()}
    ns = find(rows, **sel, method="newton_schulz", backward="lyapunov_iterative", iters=5)
    if ns is None:
        return [*lines, "Target shape not measured.", ""]
    svd = find(rows, **sel, method="svd", backward="svd")
    eig = find(rows, **sel, method="eigh", backward="lyapunov_eig")
    floor = find(rows, **sel, method="matmul_floor", iters=5)
    unrolled = find(rows, **sel, method="newton_schulz", backward="autograd", iters=5)
    lines += [
        "| quantity | value |",
        "|---|---|",
        f"| NS(5)+lyapunov_iterative fwd+bwd | {fmt(ns.fwdbwd_ms)} ms |",
        f"| speedup vs svd route (svd fwd + Ionescu svd bwd, {fmt(svd.fwdbwd_ms)} ms) "
        f"| {ns and svd and svd.fwdbwd_ms / ns.fwdbwd_ms:.2f}x |",
        f"| speedup vs eigh route (eigh fwd + lyapunov_eig bwd, {fmt(eig.fwdbwd_ms)} ms) "
        f"| {eig.fwdbwd_ms / ns.fwdbwd_ms:.2f}x |",
        f"| ratio to the matmul floor ({int(floor.matmuls_fwdbwd)} batched matmuls, "
        f"{fmt(floor.fwdbwd_ms)} ms) | {ns.fwdbwd_ms / floor.fwdbwd_ms:.2f}x |",
        f"| saved for backward: lyapunov_iterative / unrolled autograd | {fmt(ns.saved_mb)} MB / "
        f"{fmt(unrolled.saved_mb)} MB |",
    ]
    if device.type == "cuda":
        lines += [
            f"| peak memory fwd / fwd+bwd (lyapunov_iterative) | {fmt(ns.peak_fwd_mb)} / "
            f"{fmt(ns.peak_fwdbwd_mb)} MB |",
            f"| peak memory fwd / fwd+bwd (unrolled autograd) | {fmt(unrolled.peak_fwd_mb)} / "
            f"{fmt(unrolled.peak_fwdbwd_mb)} MB |",
        ]
    else:
        lines.append("| peak memory | not measured on CPU (no allocator counter): NaN in the CSV |")
    return [*lines, ""]


def auto_check(rows: list[Row]) -> tuple[list[str], bool]:
    """Is ``auto`` within 1.1x of the fastest candidate at every measured shape?"""
    lines = [
        "## `auto` vs the fastest route (forward+backward, iters=5)",
        "",
        "| dtype | d | batch | auto resolves to | auto ms | fastest | fastest ms | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    shapes = sorted({(r.dtype, r.d, r.batch) for r in rows})
    for dtype, d, batch in shapes:
        cands = []
        for method, backward in AUTO_CANDIDATES:
            it = 5 if method == "newton_schulz" else 0
            r = find(
                rows, dtype=dtype, d=d, batch=batch, method=method, backward=backward, iters=it
            )
            if r is not None:
                cands.append(r)
        auto = find(rows, dtype=dtype, d=d, batch=batch, method="auto")
        if auto is None or not cands:
            continue
        best = min(cands, key=lambda r: r.fwdbwd_ms)
        ratio = auto.fwdbwd_ms / best.fwdbwd_ms
        ok &= ratio <= 1.1
        lines.append(
            f"| {dtype} | {d} | {batch} | {auto.resolved} | {fmt(auto.fwdbwd_ms)} | "
            f"{best.method}+{best.backward} | {fmt(best.fwdbwd_ms)} | {ratio:.2f} |"
        )
    lines += [
        "",
        f"`auto` within 1.1x of the fastest at every shape: **{'yes' if ok else 'no'}**",
        "",
    ]
    return lines, ok


def suggested_auto_table(rows: list[Row]) -> list[str]:
    """Fastest float32 candidate per d (most batches win), to copy into SQRTM_AUTO_TABLE."""
    lines = ["## Fastest float32 route per d (input for `SQRTM_AUTO_TABLE`)", ""]
    for d in sorted({r.d for r in rows if r.dtype == "float32"}):
        wins: dict[str, int] = {}
        for batch in sorted({r.batch for r in rows if r.d == d}):
            cands = [
                r
                for m, b in AUTO_CANDIDATES
                if (
                    r := find(
                        rows,
                        dtype="float32",
                        d=d,
                        batch=batch,
                        method=m,
                        backward=b,
                        iters=5 if m == "newton_schulz" else 0,
                    )
                )
                is not None
            ]
            if cands:
                best = min(cands, key=lambda r: r.fwdbwd_ms)
                key = f"{best.method}+{best.backward}"
                wins[key] = wins.get(key, 0) + 1
        if wins:
            lines.append(
                f"- d={d}: " + ", ".join(f"{k} ({v} batch sizes)" for k, v in wins.items())
            )
    return [*lines, ""]


def table3(rows: list[Row], published: list[dict[str, str]], iters: list[int]) -> list[str]:
    pub = {
        r["iterations"] or "SVD": r["ms"]
        for r in published
        if r["source"].startswith("Lin & Maji BMVC 2017 Table 3")
    }
    lines = [
        "## Iterations vs time (layout of BMVC 2017 Table 3, d=512)",
        "",
        "Published: Titan X, MATLAB/MatConvNet, one 512x512 matrix, forward. Ours: this device, "
        "float32, ReLU Gram matrices (n=196), best-of-runs ms; error = mean relative Frobenius "
        "error of the forward vs a float64 eigh reference.",
        "",
        "| iterations | published fwd (ms) | ours fwd, batch 1 | ours fwd+bwd (lyapunov_iterative)"
        ", batch 1 | ours fwd+bwd (autograd), batch 1 | ours fwd, batch 32 | ours fwd+bwd "
        "(lyapunov_iterative), batch 32 | rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def get(batch, **kw):
        return find(rows, dtype="float32", d=512, batch=batch, **kw)

    for k in iters:
        b1 = get(1, method="newton_schulz", backward="lyapunov_iterative", iters=k)
        au = get(1, method="newton_schulz", backward="autograd", iters=k)
        b32 = get(32, method="newton_schulz", backward="lyapunov_iterative", iters=k)
        lines.append(
            f"| {k} | {pub.get(str(k), '—')} | {fmt(b1 and b1.fwd_ms)} | "
            f"{fmt(b1 and b1.fwdbwd_ms)} | {fmt(au and au.fwdbwd_ms)} | "
            f"{fmt(b32 and b32.fwd_ms)} | {fmt(b32 and b32.fwdbwd_ms)} | "
            f"{fmt(b1 and b1.rel_err, 4) if b1 else '—'} |"
        )
    for label, method, backward in [
        ("SVD", "svd", "svd"),
        ("eigh (ours only)", "eigh", "lyapunov_eig"),
    ]:
        b1, b32 = (
            get(1, method=method, backward=backward),
            get(32, method=method, backward=backward),
        )
        lines.append(
            f"| {label} | {pub.get('SVD', '—') if method == 'svd' else '—'} | "
            f"{fmt(b1 and b1.fwd_ms)} | {fmt(b1 and b1.fwdbwd_ms)} (bwd: {backward}) | — | "
            f"{fmt(b32 and b32.fwd_ms)} | {fmt(b32 and b32.fwdbwd_ms)} | "
            f"{fmt(b1 and b1.rel_err, 4) if b1 else '—'} |"
        )
    lines += ["", "Other published timings (from `bcnn/resources/matrix_sqrt_timings.csv`):", ""]
    lines += ["| source | device | matrix | batch | method | iterations | direction | ms | note |"]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for r in published:
        if not r["source"].startswith("Lin & Maji BMVC 2017 Table 3"):
            lines.append(
                "| "
                + " | ".join(
                    r[c]
                    for c in (
                        "source",
                        "device",
                        "matrix",
                        "batch",
                        "method",
                        "iterations",
                        "direction",
                        "ms",
                        "note",
                    )
                )
                + " |"
            )
    return [*lines, ""]


def overview(rows: list[Row]) -> list[str]:
    lines = [
        "## All shapes: key routes (best-of-runs ms, forward / forward+backward)",
        "",
        "| dtype | d | batch | NS(5)+lyap_iter | NS(5)+autograd | matmul floor NS(5) | "
        "eigh+lyap_eig | svd+svd | auto | NS(5) err | NS(20) err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, d, batch in sorted({(r.dtype, r.d, r.batch) for r in rows}):

        def g(dtype=dtype, d=d, batch=batch, **kw):
            r = find(rows, dtype=dtype, d=d, batch=batch, **kw)
            return f"{fmt(r.fwd_ms)} / {fmt(r.fwdbwd_ms)}" if r else "—"

        def e(k, dtype=dtype, d=d, batch=batch):
            r = find(
                rows,
                dtype=dtype,
                d=d,
                batch=batch,
                method="newton_schulz",
                backward="lyapunov_iterative",
                iters=k,
            )
            return f"{r.rel_err:.1e}" if r else "—"

        lines.append(
            f"| {dtype} | {d} | {batch} | "
            f"{g(method='newton_schulz', backward='lyapunov_iterative', iters=5)} | "
            f"{g(method='newton_schulz', backward='autograd', iters=5)} | "
            f"{g(method='matmul_floor', iters=5)} | {g(method='eigh', backward='lyapunov_eig')} | "
            f"{g(method='svd', backward='svd')} | {g(method='auto')} | {e(5)} | {e(20)} |"
        )
    return [*lines, ""]


def write_outputs(args, rows, device, header, skipped, started) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = [f for f in Row.__dataclass_fields__ if f != "extra"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: v for k, v in asdict(r).items() if k in fields})
    auto_lines, _ = auto_check(rows)
    md = [f"# Matrix square root benchmark ({device.type})", ""]
    md += [f"- {line}" for line in header]
    md += [f"- load average at end (1/5/15 min): {load_average()}"]
    md += [f"- wall time: {time.time() - started:.0f} s"]
    if skipped:
        md += [
            "- shapes skipped (batch*d^3 above --max-work / --max-work-float64): "
            + ", ".join(skipped)
        ]
    md += ["", *target_summary(rows, device), *table3(rows, published_timings(), args.iters)]
    md += [*auto_lines, *suggested_auto_table(rows), *overview(rows)]
    md += [
        "Peak memory is only measured on CUDA (`torch.cuda.max_memory_allocated`); `saved_mb` in "
        "the CSV counts the bytes autograd saves for backward (all devices).",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    if not args.no_plot:
        plot(rows, out.with_suffix(".png"), device)


def _pick(values: set, preferred):
    """``preferred`` if measured, else the largest value measured (None if nothing)."""
    return preferred if preferred in values else max(values, default=None)


def plot(rows: list[Row], path: Path, device: torch.device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    dtype = "float32" if any(r.dtype == "float32" for r in rows) else "float64"
    mine = [r for r in rows if r.dtype == dtype]

    # (a) time vs iterations at the target shape (or the largest measured one).
    ax = axes[0]
    d = _pick({r.d for r in mine}, TARGET["d"])
    batch = _pick({r.batch for r in mine if r.d == d}, TARGET["batch"])
    sel = [r for r in mine if r.d == d and r.batch == batch]
    for backward in BACKWARDS:
        pts = sorted(
            (r.iters, r.fwdbwd_ms)
            for r in sel
            if r.method == "newton_schulz" and r.backward == backward
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"NS + {backward} (fwd+bwd)")
    for method, key, style, label in [
        ("newton_schulz", "fwd_ms", dict(marker="s", ls="--", color="k"), "NS forward only"),
        ("matmul_floor", "fwdbwd_ms", dict(marker=".", ls=":", color="gray"), "matmul floor"),
    ]:
        pts = sorted(
            (r.iters, getattr(r, key))
            for r in sel
            if r.method == method
            and r.backward == "lyapunov_iterative"
            and not (method == "matmul_floor" and r.matmuls_fwdbwd == 0)  # nothing timed
        )
        if pts:
            ax.plot(*zip(*pts), label=f"{label} (NS+lyapunov_iterative)", **style)
    for method, backward, color in [("eigh", "lyapunov_eig", "tab:green"), ("svd", "svd", "r")]:
        r = find(sel, method=method, backward=backward)
        if r:
            ax.axhline(r.fwdbwd_ms, color=color, ls="-.", label=f"{method}+{backward} (fwd+bwd)")
    ax.set_title(f"d={d}, batch {batch}, {dtype}, {device.type}")
    ax.set_xlabel("Newton-Schulz iterations")

    # (b) forward+backward vs d at the batch size measured for the most d.
    ax = axes[1]
    batches = {r.batch for r in mine}
    big = max(batches, key=lambda b: (len({r.d for r in mine if r.batch == b}), b), default=None)
    for method, backward, k, label in [
        ("newton_schulz", "lyapunov_iterative", 5, "NS(5)+lyapunov_iterative"),
        ("newton_schulz", "autograd", 5, "NS(5)+autograd"),
        ("eigh", "lyapunov_eig", 0, "eigh+lyapunov_eig"),
        ("svd", "svd", 0, "svd+svd"),
        ("auto", "auto", 5, "auto"),
    ]:
        pts = sorted(
            (r.d, r.fwdbwd_ms)
            for r in mine
            if r.batch == big and r.method == method and r.backward == backward and r.iters == k
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_title(f"forward+backward vs d, batch {big}, {dtype}")
    ax.set_xlabel("d")

    # (c) forward error vs iterations (float64 if measured: float32 floors at ~1e-7).
    ax = axes[2]
    err_dtype = "float64" if any(r.dtype == "float64" for r in rows) else dtype
    err_rows = [r for r in rows if r.dtype == err_dtype]
    err_batch = min({r.batch for r in err_rows}, default=None)
    for d in sorted({r.d for r in err_rows}):
        pts = sorted(
            (r.iters, max(r.rel_err, 1e-16))
            for r in err_rows
            if r.d == d
            and r.batch == err_batch
            and r.method == "newton_schulz"
            and r.backward == "lyapunov_iterative"
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"d={d}")
    ax.set_title(f"NS forward error vs float64 eigh ({err_dtype}, batch {err_batch})")
    ax.set_xlabel("Newton-Schulz iterations")
    ax.set_ylabel("relative Frobenius error (ReLU Gram, n=196)")
    for ax in axes:
        ax.set_yscale("log")
        if ax is not axes[2]:
            ax.set_ylabel("ms (best of runs)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_rows(path: Path) -> list[Row]:
    types = {f.name: f.type for f in Row.__dataclass_fields__.values()}
    casts = {"int": int, "float": float, "str": str}
    with open(path) as f:
        return [
            Row(**{k: casts[types[k]](v) for k, v in rec.items() if k in types})
            for rec in csv.DictReader(f)
        ]


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.replot:
        rows = read_rows(Path(args.out).with_suffix(".csv"))
        plot(rows, Path(args.out).with_suffix(".png"), device)
        return rows
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.time()
    header = [
        f"device: {device_description(device)}",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"torch: {torch.__version__}, python {platform.python_version()}",
        "command: "
        + shlex.join(
            [
                "python",
                "scripts/bench_matrix_functions.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        f"auto table in use: {SQRTM_AUTO_TABLE.get(device.type, SQRTM_AUTO_TABLE['cuda'])}",
        f"timing: best (and median) {'process CPU' if args.clock == 'cpu' else 'wall'} time of "
        f"up to {args.repeats} runs after warm-up (a measurement stops repeating after "
        f"{args.budget_s} s of timed runs); CUDA synchronized around each run; *_ms columns "
        "are the best run, *_median_ms the median",
        f"load average at start (1/5/15 min): {load_average()}",
    ]
    rows: list[Row] = []
    skipped = []
    for dtype_name in args.dtypes:
        for d in args.dims:
            for batch in args.batches:
                limit = args.max_work_float64 if dtype_name == "float64" else args.max_work
                if batch * d**3 > limit:
                    skipped.append(f"{dtype_name} d={d} batch={batch}")
                    continue
                print(
                    f"[{time.time() - started:6.0f}s] {dtype_name} d={d} batch={batch}", flush=True
                )
                rows += measure_shape(args, device, dtype_name, d, batch)
    write_outputs(args, rows, device, header, skipped, started)
    print(f"wrote {args.out}.csv/.md/.png in {time.time() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
