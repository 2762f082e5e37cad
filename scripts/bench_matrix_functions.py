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
import importlib.resources
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import benchlib as bench
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
        "--deadline-s",
        type=float,
        default=None,
        help="start no shape after this many seconds (the target shape comes first and always "
        "runs); the shapes left out are listed in the report",
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
        choices=bench.CLOCKS,
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
    bench.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    bench.synchronize(device)
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
        fwd, fwdbwd = (timed(args, fn, device) for fn in (forward, forward_backward))
        row = Row(**common, method=method, backward=backward, iters=k, resolved=resolved)
        row.fwd_ms, row.fwdbwd_ms, row.rel_err = fwd.best * 1e3, fwdbwd.best * 1e3, err
        row.fwd_median_ms, row.fwdbwd_median_ms = fwd.median * 1e3, fwdbwd.median * 1e3
        row.saved_mb = saved_megabytes(forward)
        row.peak_fwd_mb = peak_megabytes(forward, device)
        row.peak_fwdbwd_mb = peak_megabytes(forward_backward, device)
        if method == "newton_schulz":
            row.matmuls_fwd = newton_schulz_matmuls(k)
            if backward == "lyapunov_iterative":
                row.matmuls_fwdbwd = row.matmuls_fwd + lyapunov_iterative_matmuls(k)
        row.timed_runs = min(fwd.runs, fwdbwd.runs)
        rows.append(row)
        print(
            f"  {method:>13} {backward:>18} k={k:<2} fwd {row.fwd_ms:9.2f} ms  "
            f"fwd+bwd {row.fwdbwd_ms:9.2f} ms  err {err:.2e}",
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
        fwd, fwdbwd = (timed(args, lambda n=n: chain(n), device) for n in (n_fwd, n_all))
        row.fwd_ms, row.fwd_median_ms = fwd.best * 1e3, fwd.median * 1e3
        row.fwdbwd_ms, row.fwdbwd_median_ms = fwdbwd.best * 1e3, fwdbwd.median * 1e3
        row.matmuls_fwd, row.matmuls_fwdbwd = n_fwd, n_all
        row.timed_runs = min(fwd.runs, fwdbwd.runs)
        rows.append(row)
    return rows


def timed(args: argparse.Namespace, fn: Callable[[], object], device: torch.device) -> bench.Timing:
    """``fn`` timed as the arguments say (best and median of the runs are reported)."""
    return bench.measure(
        fn, device, budget_s=args.budget_s, max_runs=args.repeats, clock_kind=args.clock
    )


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


FIELDS = [f for f in Row.__dataclass_fields__ if f != "extra"]


def report(
    args: argparse.Namespace, rows: list[Row], info: bench.RunInfo, skipped: dict[str, list[str]]
) -> None:
    """Writes ``<out>.csv`` and ``<out>.md`` (and ``<out>.png`` unless ``--no-plot``)."""
    out = Path(args.out)
    bench.write_csv(out.with_suffix(".csv"), [asdict(r) for r in rows], FIELDS)
    device = info.device
    auto_lines, _ = auto_check(rows)
    auto_row = SQRTM_AUTO_TABLE.get(device.type, SQRTM_AUTO_TABLE["cuda"])
    md = [
        f"- auto table in use: {auto_row}",
        f"- timing: best (and median) {'process CPU' if args.clock == 'cpu' else 'wall'} time "
        f"per call of up to {args.repeats} runs after warm-up (`benchlib.measure`: "
        "torch.utils.benchmark's adaptive_autorange; a measurement stops repeating after "
        f"{args.budget_s} s of timed runs); CUDA synchronized around each run; *_ms columns "
        "are the best run, *_median_ms the median",
    ]
    for reason, shapes in skipped.items():
        if shapes:
            md.append(f"- shapes skipped ({reason}): " + ", ".join(shapes))
    md += ["", *target_summary(rows, device), *table3(rows, published_timings(), args.iters)]
    md += [*auto_lines, *suggested_auto_table(rows), *overview(rows)]
    md += [
        "Peak memory is only measured on CUDA (`torch.cuda.max_memory_allocated`); `saved_mb` in "
        "the CSV counts the bytes autograd saves for backward (all devices).",
    ]
    title = f"Matrix square root benchmark ({device.type})"
    bench.write_markdown(out.with_suffix(".md"), title, info, md)


def _pick(values: set, preferred):
    """``preferred`` if measured, else the largest value measured (None if nothing)."""
    return preferred if preferred in values else max(values, default=None)


def plot(rows: list[Row], path: Path, device: torch.device) -> None:
    """Draws ``path``: time vs iterations, time vs d, and error vs iterations."""
    try:
        import matplotlib
    except ImportError:  # a GPU machine with torch but not the plotting stack
        print(f"matplotlib is not installed: {path} not drawn (--replot draws it later)")
        return

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


def shapes(args: argparse.Namespace) -> tuple[list[tuple[str, int, int]], list[str]]:
    """The (dtype, d, batch) grid to measure, the target shape first, and those skipped."""
    grid, skipped = [], []
    for dtype_name in args.dtypes:
        limit = args.max_work_float64 if dtype_name == "float64" else args.max_work
        for d in args.dims:
            for batch in args.batches:
                if batch * d**3 > limit:
                    skipped.append(f"{dtype_name} d={d} batch={batch}")
                else:
                    grid.append((dtype_name, d, batch))
    target = (TARGET["dtype"], TARGET["d"], TARGET["batch"])
    return sorted(grid, key=lambda shape: shape != target), skipped


def measure_all(
    args: argparse.Namespace, info: bench.RunInfo, on_shape: Callable[[list[Row], list[str]], None]
) -> tuple[list[Row], list[str]]:
    """Measures every shape of the grid until ``--deadline-s``.

    Args:
        args: The parsed arguments.
        info: The run (its device).
        on_shape: Called with the rows so far and the shapes left out by the deadline after
            each shape (the report is rewritten, so that a killed run keeps what it measured).

    Returns:
        The rows and the shapes left out by the deadline.
    """
    deadline = bench.Deadline(args.deadline_s)
    grid, _ = shapes(args)
    rows: list[Row] = []
    for i, (dtype_name, d, batch) in enumerate(grid):
        if i and deadline.expired():  # the first (target) shape always runs
            return rows, [f"{t} d={dd} batch={b}" for t, dd, b in grid[i:]]
        print(f"[{deadline.elapsed():6.0f}s] {dtype_name} d={d} batch={batch}", flush=True)
        rows += measure_shape(args, info.device, dtype_name, d, batch)
        on_shape(rows, [])
    return rows, []


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.replot:
        rows = read_rows(Path(args.out).with_suffix(".csv"))
        plot(rows, Path(args.out).with_suffix(".png"), device)
        return rows
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = bench.RunInfo.start(__file__, argv, device)
    _, too_big = shapes(args)

    def write(rows: list[Row], late: list[str]) -> None:
        skipped = {
            "batch*d^3 above --max-work / --max-work-float64": too_big,
            f"not started before --deadline-s {args.deadline_s}": late,
        }
        report(args, rows, info.finish(), skipped)

    rows, late = measure_all(args, info, write)
    write(rows, late)
    if not args.no_plot:
        plot(rows, Path(args.out).with_suffix(".png"), device)
    print(f"wrote {args.out}.csv/.md{'' if args.no_plot else '/.png'} in {info.seconds:.0f} s")
    return rows


if __name__ == "__main__":
    main()
