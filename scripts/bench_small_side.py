"""Benchmark the small-side (n x n) matrix square root against pooling A and the d x d route.

Times forward + backward (w.r.t. the features X) of the B-CNN head on (B, n, d) features:
sum pooling A = X^T X / n, ridge, matrix square root, L2 normalisation of the flattened
matrix (the gradient of the descriptor is a fixed random matrix). Routes:

    dxd_eigh   pool A, sqrtm(method="eigh", backward="lyapunov_eig")     (exact)
    small_eigh sqrtm_from_features(X, "eigh")                             (exact, n x n)
    dxd_ns5    pool A, sqrtm(method="newton_schulz", iters=5)  (lyapunov_iterative backward)
    small_ns5  sqrtm_from_features(X, "newton_schulz", iters=5)           (autograd backward)

and, with ``--with-autograd``, dxd_ns5_autograd (the d x d iterations under autograd: the
gradient small_ns5 reproduces). ``--functions power log`` adds the other matrix functions of
the small side (eigh on both routes): dxd_pow / small_pow (``powm`` with p = ``--power``,
against ``powm_from_features``) and dxd_log / small_log (``logm`` against
``logm_from_features``). Every route of a shape runs in this one process on the same
data; each is warmed up once at batch 2, then timed (best of up to ``--repeats`` runs within
``--budget-s``). Accuracy: each route's descriptor and gradient in the timed dtype against
the same computation in float64 on the first two samples (the float64 reference of the
eigh routes is small_eigh, of the Newton-Schulz routes small_ns5, of the others small_pow
and small_log: each equals its d x d counterpart to ~1e-12 in float64, see
tests/test_ops_small_side.py). Writes ``<out>.csv`` and ``<out>.md`` (device, date, torch
version, thread count, load average, the exact command, speed-ups against the targets, the
cost rule's choice) after every shape; ``--deadline-s`` starts no shape after that many
seconds.

Example:
    python scripts/bench_small_side.py --device cpu --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import benchlib as bench
import torch
import torch.nn.functional as F

from bcnn.models.normalization import add_ridge
from bcnn.ops import (
    logm,
    logm_from_features,
    powm,
    powm_from_features,
    small_side_cheaper,
    sqrtm,
    sqrtm_from_features,
)
from bcnn.ops.small_side import dxd_flops, small_side_flops

# The shapes of issue 16, then three near the cost rule's boundary (rule check).
SHAPES = [(196, 512), (196, 768), (196, 1920), (784, 512), (196, 256), (196, 384), (392, 512)]
QUICK_SHAPES = [(6, 24), (12, 16), (24, 16)]
# Speed-ups of the small side over the d x d route asked for in issue 16 (CPU).
TARGETS = {(196, 512): 3.0, (196, 1920): 10.0}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
FUNCTIONS = ("sqrt", "power", "log")
# Eigenvalue floors of the chain's MatrixPower / MatrixLog defaults (powm / logm).
POWER_FLOOR, LOG_FLOOR = 1e-8, 1e-6
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
        choices=bench.CLOCKS,
        default=None,
        help="wall time, or process CPU time (robust on a shared machine with --threads 1); "
        "default: wall (cpu with --threads 1 on CPU)",
    )
    p.add_argument("--with-autograd", action="store_true", help="also time dxd_ns5_autograd")
    p.add_argument(
        "--functions",
        nargs="+",
        default=["sqrt"],
        choices=FUNCTIONS,
        help="matrix functions to time (sqrt: eigh and Newton-Schulz routes; power, log: eigh)",
    )
    p.add_argument("--power", type=float, default=0.3, help="p of the power routes")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="start no new shape after this many seconds (the issue's shapes come first)",
    )
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


# The head under test.


def make_routes(args: argparse.Namespace) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    eps, mode = args.eps, args.eps_mode

    def pooled(X: torch.Tensor) -> torch.Tensor:
        return add_ridge(X.mT @ X / X.shape[-2], eps, mode)

    routes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if "sqrt" in args.functions:
        routes["dxd_eigh"] = lambda X: sqrtm(pooled(X), method="eigh", backward="lyapunov_eig")
        routes["small_eigh"] = lambda X: sqrtm_from_features(X, "eigh", eps=eps, eps_mode=mode)
        routes["dxd_ns5"] = lambda X: sqrtm(
            pooled(X), method="newton_schulz", iters=5, backward="lyapunov_iterative"
        )
        routes["small_ns5"] = lambda X: sqrtm_from_features(
            X, "newton_schulz", iters=5, eps=eps, eps_mode=mode
        )
        if args.with_autograd:
            routes["dxd_ns5_autograd"] = lambda X: sqrtm(
                pooled(X), method="newton_schulz", iters=5, backward="autograd"
            )
    if "power" in args.functions:
        p = args.power
        routes["dxd_pow"] = lambda X: powm(pooled(X), p, eps=POWER_FLOOR)
        routes["small_pow"] = lambda X: powm_from_features(
            X, p, eps=eps, eps_mode=mode, floor=POWER_FLOOR
        )
    if "log" in args.functions:
        routes["dxd_log"] = lambda X: logm(pooled(X), method="eigh", eps=LOG_FLOOR)
        routes["small_log"] = lambda X: logm_from_features(
            X, eps=eps, eps_mode=mode, floor=LOG_FLOOR
        )
    return routes


# Each route's float64 reference (a small-side route: cheap) and pair in the speed-up table.
REFERENCE = {
    "dxd_eigh": "small_eigh",
    "small_eigh": "small_eigh",
    "dxd_ns5": "small_ns5",
    "small_ns5": "small_ns5",
    "dxd_ns5_autograd": "small_ns5",
    "dxd_pow": "small_pow",
    "small_pow": "small_pow",
    "dxd_log": "small_log",
    "small_log": "small_log",
}
PAIRS = {"eigh": ("dxd_eigh", "small_eigh"), "NS 5": ("dxd_ns5", "small_ns5")}
PAIRS |= {"power": ("dxd_pow", "small_pow"), "log": ("dxd_log", "small_log")}


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
    """Times every route at (n, d) and measures its error against float64 (one row each)."""
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(args.batch, n, d, generator=gen, dtype=dtype).relu().to(device)
    W = torch.randn(args.batch, d * d, generator=gen, dtype=dtype).to(device)
    routes = make_routes(args)
    rows, outputs = [], {}
    for name, route in routes.items():
        holder: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def run(route=route, holder=holder) -> None:
            holder["out"] = step(route, X, W)

        # measure() warms up at the full batch before timing (kernels, LAPACK workspaces).
        timing = bench.measure(
            run, device, budget_s=args.budget_s, max_runs=args.repeats, clock_kind=args.clock
        )
        outputs[name] = holder["out"]
        method = "newton_schulz" if "ns5" in name else "eigh"
        flops = small_side_flops if name.startswith("small") else dxd_flops
        rows.append(
            {
                "device": device.type,
                "dtype": args.dtype,
                "n": n,
                "d": d,
                "batch": args.batch,
                "route": name,
                "time_ms": timing.best * 1e3,
                "median_ms": timing.median * 1e3,
                "runs": timing.runs,
                "rel_err_out": "",
                "rel_err_grad": "",
                "model_gflops": args.batch * flops(n, d, method, 5) / 1e9,
                "rule_small_side": small_side_cheaper(n, d, method, 5),
            }
        )
        print(f"n={n:4d} d={d:5d} {name:18s} {timing.best * 1e3:10.1f} ms ({timing.runs} runs)")
    # float64 references on two samples (cheap: the small-side routes).
    X64, W64 = X[:2].double(), W[:2].double()
    refs = {ref: step(routes[ref], X64, W64) for ref in {REFERENCE[name] for name in routes}}
    for row in rows:
        ref = refs[REFERENCE[row["route"]]]
        z, g = outputs[row["route"]]
        row["rel_err_out"] = rel_err(z[:2], ref[0])
        row["rel_err_grad"] = rel_err(g[:2], ref[1])
    return rows


def speedup_table(rows: list[dict]) -> list[str]:
    """Per shape: d x d and small-side times of each measured pair, the speed-ups, the targets
    and the cost rule's choice."""
    by_key = {(r["n"], r["d"], r["route"]): r for r in rows}
    measured = {r["route"] for r in rows}
    pairs = {label: pair for label, pair in PAIRS.items() if set(pair) <= measured}
    head = ["n", "d"]
    for label, (dxd, small) in pairs.items():
        head += [f"{dxd} ms", f"{small} ms", f"speed-up ({label})"]
        if label == "eigh":
            head += ["target", "met"]
    head += [f"rule picks small side ({' / '.join(pairs)})"]
    head += [f"modelled speed-up ({' / '.join(pairs)})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, d in dict.fromkeys((r["n"], r["d"]) for r in rows):
        cells, rule, model = [str(n), str(d)], [], []
        for label, (dxd, small) in pairs.items():
            big, little = by_key[(n, d, dxd)], by_key[(n, d, small)]
            speedup = big["time_ms"] / little["time_ms"]
            cells += [f"{big['time_ms']:.1f}", f"{little['time_ms']:.1f}", f"{speedup:.1f}x"]
            if label == "eigh":
                target = TARGETS.get((n, d))
                met = "" if target is None else ("yes" if speedup >= target else "**no**")
                cells += ["" if target is None else f">= {target:g}x", met]
            rule.append(str(little["rule_small_side"]))
            model.append(f"{big['model_gflops'] / little['model_gflops']:.1f}x")
        lines.append("| " + " | ".join([*cells, " / ".join(rule), " / ".join(model)]) + " |")
    return lines


def rule_check(rows: list[dict]) -> list[str]:
    """Where the cost rule chose the small side but it was measured slower (never, ideally)."""
    by_key = {(r["n"], r["d"], r["route"]): r for r in rows}
    slower = []
    for n, d in dict.fromkeys((r["n"], r["d"]) for r in rows):
        for dxd, small in PAIRS.values():
            big, little = by_key.get((n, d, dxd)), by_key.get((n, d, small))
            if big and little and little["rule_small_side"] and little["time_ms"] > big["time_ms"]:
                slower.append(f"({n}, {d}) {small}: {little['time_ms'] / big['time_ms']:.2f}x")
    verdict = "none" if not slower else "; ".join(slower)
    return [f"Shapes where the rule picks the small side and it was measured slower: {verdict}."]


def report(rows: list[dict], args: argparse.Namespace, info: bench.RunInfo, late: list) -> None:
    """Writes ``<out>.csv`` and ``<out>.md``."""
    out = Path(args.out)
    bench.write_csv(out.with_suffix(".csv"), rows, FIELDS)
    functions = {"sqrt": "matrix square root", "power": f"matrix power {args.power}"}
    functions["log"] = "matrix logarithm"
    lines = [f"- clock: {args.clock}"]
    if late:
        lines.append(
            f"- shapes not started before --deadline-s {args.deadline_s}: "
            + ", ".join(f"{n}x{d}" for n, d in late)
        )
    lines += [
        "",
        "Forward + backward (w.r.t. X) of sum pooling + ridge + "
        + " / ".join(functions[f] for f in args.functions)
        + " + L2 normalisation of the flattened matrix, features X = relu(randn) of shape "
        f"({args.batch}, n, d), {args.dtype}. Times: best of the timed runs "
        f"({args.clock} clock). speed-up = d x d time / small-side time.",
        "",
        *speedup_table(rows),
        "",
        *rule_check(rows),
        "",
        "## All rows",
        "",
        *bench.markdown_table(
            rows,
            {
                "n": "n",
                "d": "d",
                "route": "route",
                "time_ms": "best ms",
                "median_ms": "median ms",
                "runs": "runs",
                "rel_err_out": "rel. err. descriptor vs float64",
                "rel_err_grad": "rel. err. gradient vs float64",
                "model_gflops": "modelled GFLOP",
            },
            formats={"time_ms": ".1f", "median_ms": ".1f", "rel_err_out": ".1e"}
            | {"rel_err_grad": ".1e"},
        ),
        "",
        "rel. err.: against the float64 computation of the same function on the first two "
        "samples (eigh routes: the exact function and its exact gradient; Newton-Schulz routes: "
        "the 5-iteration approximation and the exact gradient of that approximation). The "
        "gradient column of dxd_ns5 is therefore not rounding: its lyapunov_iterative "
        "backward approximates the gradient of the exact root instead (docs/ops.md).",
    ]
    title = "Small-side matrix functions vs the d x d route"
    bench.write_markdown(out.with_suffix(".md"), title, info, lines)


def measure_all(
    args: argparse.Namespace, info: bench.RunInfo, on_shape: Callable[[list[dict], list], None]
) -> tuple[list[dict], list[tuple[int, int]]]:
    """Measures the shapes in order until ``--deadline-s``; ``on_shape(rows, [])`` after each.

    Returns:
        The rows and the shapes left out by the deadline.
    """
    deadline = bench.Deadline(args.deadline_s)
    rows: list[dict] = []
    for i, (n, d) in enumerate(args.shapes):
        if i and deadline.expired():  # the first shape always runs
            return rows, args.shapes[i:]
        rows += bench_shape(n, d, args, info.device)
        on_shape(rows, [])
    return rows, []


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = bench.RunInfo.start(__file__, argv, device)

    def write(rows: list[dict], late: list) -> None:
        report(rows, args, info.finish(), late)

    rows, late = measure_all(args, info, write)
    write(rows, late)
    print(f"wrote {args.out}.csv and {args.out}.md")
    return rows


if __name__ == "__main__":
    main()
