"""Benchmark the small-side (n x n) matrix square root against pooling A and the d x d route.

Times forward + backward (w.r.t. the features X) of the B-CNN head on (B, n, d) features:
sum pooling A = X^T X / n, ridge, matrix square root, L2 normalisation of the flattened
matrix (the gradient of the descriptor is a fixed random matrix). Routes:

    dxd_eigh   pool A, sqrtm(method="eigh", backward="lyapunov_eig")     (exact)
    small_eigh sqrtm_from_features(X, "eigh")                             (exact, n x n)
    dxd_ns5    pool A, sqrtm(method="newton_schulz", iters=5)  (lyapunov_iterative backward)
    small_ns5  sqrtm_from_features(X, "newton_schulz", iters=5)           (autograd backward)

and, with ``--with-autograd``, dxd_ns5_autograd (the d x d iterations under autograd: the
gradient small_ns5 reproduces). Every route of a shape runs in this one process on the same
data; each is warmed up once at batch 2, then timed (best of up to ``--repeats`` runs within
``--budget-s``). Accuracy: each route's descriptor and gradient in the timed dtype against
the same computation in float64 on the first two samples (the float64 reference of the
eigh routes is small_eigh, of the Newton-Schulz routes small_ns5: both equal their d x d
counterparts to ~1e-12 in float64, see tests/test_ops_small_side.py). Writes ``<out>.csv``
and ``<out>.md`` (device, date, torch version, thread count, load average, the exact
command, speed-ups against the targets, the cost rule's choice).

Example:
    python scripts/bench_small_side.py --device cpu --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bcnn.models.normalization import add_ridge
from bcnn.ops import small_side_cheaper, sqrtm, sqrtm_from_features
from bcnn.ops.small_side import dxd_flops, small_side_flops

# The shapes of issue 16, then three near the cost rule's boundary (rule check).
SHAPES = [(196, 512), (196, 768), (196, 1920), (784, 512), (196, 256), (196, 384), (392, 512)]
QUICK_SHAPES = [(6, 24), (12, 16), (24, 16)]
# Speed-ups of the small side over the d x d route asked for in issue 16 (CPU).
TARGETS = {(196, 512): 3.0, (196, 1920): 10.0}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
FIELDS = [
    "device",
    "dtype",
    "n",
    "d",
    "batch",
    "route",
    "time_ms",
    "median_ms",
    "runs",
    "rel_err_out",
    "rel_err_grad",
    "model_gflops",
    "rule_small_side",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--shapes", nargs="+", default=None, help="n x d pairs, e.g. 196x512")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--eps", type=float, default=1e-4, help="ridge (the presets' 1e-4)")
    p.add_argument("--eps-mode", default="trace", choices=["abs", "trace"])
    p.add_argument("--repeats", type=int, default=3, help="most timed runs per route")
    p.add_argument("--budget-s", type=float, default=3.0, help="stop timing a route after this")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default=None,
        help="wall time, or process CPU time (robust on a shared machine with --threads 1); "
        "default: wall (cpu with --threads 1 on CPU)",
    )
    p.add_argument("--with-autograd", action="store_true", help="also time dxd_ns5_autograd")
    p.add_argument("--quick", action="store_true", help="tiny shapes, batch 2: seconds")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.budget_s = 2, 1, 0.01
    if args.shapes is None:
        args.shapes = QUICK_SHAPES if args.quick else SHAPES
    else:
        try:
            args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        except ValueError:
            p.error(f"--shapes: expected n x d pairs such as 196x512, got {args.shapes}")
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu measures this process's CPU time: use --clock wall on a GPU")
    if args.out is None:
        args.out = f"benchmarks/results/small_side_{torch.device(args.device).type}"
    return args


# Machine description and timing: kept small and self-contained (see the module docstring).


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical cores"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(
    fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float, clock: str
) -> list[float]:
    """Seconds of up to ``repeats`` runs of ``fn``, stopping once ``budget_s`` is spent."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    times: list[float] = []
    while len(times) < repeats:
        synchronize(device)
        t0 = timer()
        fn()
        synchronize(device)
        times.append(timer() - t0)
        if sum(times) >= budget_s:
            break
    return times


# The head under test.


def make_routes(args: argparse.Namespace) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    eps, mode = args.eps, args.eps_mode

    def pooled(X: torch.Tensor) -> torch.Tensor:
        return add_ridge(X.mT @ X / X.shape[-2], eps, mode)

    routes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "dxd_eigh": lambda X: sqrtm(pooled(X), method="eigh", backward="lyapunov_eig"),
        "small_eigh": lambda X: sqrtm_from_features(X, "eigh", eps=eps, eps_mode=mode),
        "dxd_ns5": lambda X: sqrtm(
            pooled(X), method="newton_schulz", iters=5, backward="lyapunov_iterative"
        ),
        "small_ns5": lambda X: sqrtm_from_features(
            X, "newton_schulz", iters=5, eps=eps, eps_mode=mode
        ),
    }
    if args.with_autograd:
        routes["dxd_ns5_autograd"] = lambda X: sqrtm(
            pooled(X), method="newton_schulz", iters=5, backward="autograd"
        )
    return routes


def step(route: Callable, X: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward of the head: descriptor z and dL/dX for dL/dz = W."""
    x = X.detach().requires_grad_()
    z = F.normalize(route(x).flatten(-2), dim=-1)
    z.backward(W)
    return z.detach(), x.grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-300))


def bench_shape(n: int, d: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(args.batch, n, d, generator=gen, dtype=dtype).relu().to(device)
    W = torch.randn(args.batch, d * d, generator=gen, dtype=dtype).to(device)
    routes = make_routes(args)
    rows, outputs = [], {}
    for name, route in routes.items():
        # Warm-up at batch 2: allocator, kernels and LAPACK workspaces, without paying for a
        # full batch (a d x d route at d = 1920 takes minutes on one core).
        step(route, X[:2], W[:2])
        holder: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def run(route=route, holder=holder) -> None:
            holder["out"] = step(route, X, W)

        times = time_runs(run, device, args.repeats, args.budget_s, args.clock)
        outputs[name] = holder["out"]
        method = "eigh" if "eigh" in name else "newton_schulz"
        flops = small_side_flops if name.startswith("small") else dxd_flops
        rows.append(
            {
                "device": device.type,
                "dtype": args.dtype,
                "n": n,
                "d": d,
                "batch": args.batch,
                "route": name,
                "time_ms": min(times) * 1e3,
                "median_ms": statistics.median(times) * 1e3,
                "runs": len(times),
                "rel_err_out": "",
                "rel_err_grad": "",
                "model_gflops": args.batch * flops(n, d, method, 5) / 1e9,
                "rule_small_side": small_side_cheaper(n, d, method, 5),
            }
        )
        print(f"n={n:4d} d={d:5d} {name:18s} {min(times) * 1e3:10.1f} ms ({len(times)} runs)")
    # float64 references on two samples (cheap: the small-side routes).
    X64, W64 = X[:2].double(), W[:2].double()
    refs = {name: step(routes[name], X64, W64) for name in ("small_eigh", "small_ns5")}
    for row in rows:
        ref = refs["small_eigh" if "eigh" in row["route"] else "small_ns5"]
        z, g = outputs[row["route"]]
        row["rel_err_out"] = rel_err(z[:2], ref[0])
        row["rel_err_grad"] = rel_err(g[:2], ref[1])
    return rows


def speedup_table(rows: list[dict]) -> list[str]:
    by_key = {(r["n"], r["d"], r["route"]): r for r in rows}
    lines = [
        "| n | d | dxd_eigh ms | small_eigh ms | speed-up (eigh) | target | met | "
        "dxd_ns5 ms | small_ns5 ms | speed-up (NS 5) | rule picks small side (eigh / NS) | "
        "modelled speed-up (eigh / NS) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, d in dict.fromkeys((r["n"], r["d"]) for r in rows):
        de, se = by_key[(n, d, "dxd_eigh")], by_key[(n, d, "small_eigh")]
        dn, sn = by_key[(n, d, "dxd_ns5")], by_key[(n, d, "small_ns5")]
        sp_e = de["time_ms"] / se["time_ms"]
        sp_n = dn["time_ms"] / sn["time_ms"]
        target = TARGETS.get((n, d))
        met = "" if target is None else ("yes" if sp_e >= target else "**no**")
        model_e = de["model_gflops"] / se["model_gflops"]
        model_n = dn["model_gflops"] / sn["model_gflops"]
        lines.append(
            f"| {n} | {d} | {de['time_ms']:.1f} | {se['time_ms']:.1f} | {sp_e:.1f}x | "
            f"{'' if target is None else f'>= {target:g}x'} | {met} | {dn['time_ms']:.1f} | "
            f"{sn['time_ms']:.1f} | {sp_n:.1f}x | {se['rule_small_side']} / "
            f"{sn['rule_small_side']} | {model_e:.1f}x / {model_n:.1f}x |"
        )
    return lines


def write_results(rows: list[dict], args: argparse.Namespace, header: dict[str, str]) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Small-side matrix square root vs the d x d route", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [
        "",
        "Forward + backward (w.r.t. X) of sum pooling + ridge + matrix square root + L2 "
        "normalisation of the flattened matrix, features X = relu(randn) of shape "
        f"({args.batch}, n, d), {args.dtype}. Times: best of the timed runs "
        f"({args.clock} clock). speed-up = d x d time / small-side time.",
        "",
        *speedup_table(rows),
        "",
        "## All rows",
        "",
        "| n | d | route | best ms | median ms | runs | rel. err. descriptor vs float64 | "
        "rel. err. gradient vs float64 | modelled GFLOP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errs = ["" if r[k] == "" else f"{r[k]:.1e}" for k in ("rel_err_out", "rel_err_grad")]
        lines.append(
            f"| {r['n']} | {r['d']} | {r['route']} | {r['time_ms']:.1f} | {r['median_ms']:.1f} "
            f"| {r['runs']} | {errs[0]} | {errs[1]} | {r['model_gflops']:.2f} |"
        )
    lines += [
        "",
        "rel. err.: against the float64 computation of the same function on the first two "
        "samples (eigh routes: the exact root and its exact gradient; Newton-Schulz routes: "
        "the 5-iteration approximation and the exact gradient of that approximation). The "
        "gradient column of dxd_ns5 is therefore not rounding: its lyapunov_iterative "
        "backward approximates the gradient of the exact root instead (docs/ops.md).",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python scripts/bench_small_side.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    header = {
        "device": device_description(device),
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "clock": args.clock,
        "load average before (1 / 5 / 15 min)": load_average(),
        "command": f"`{command}`",
    }
    rows: list[dict] = []
    for n, d in args.shapes:
        rows += bench_shape(n, d, args, device)
    header["load average after (1 / 5 / 15 min)"] = load_average()
    write_results(rows, args, header)
    print(f"wrote {args.out}.csv and {args.out}.md")
    return rows


if __name__ == "__main__":
    main()
