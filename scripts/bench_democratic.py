"""gamma-democratic weights: the n x n Gram route against the factored route.

Times forward + backward (with respect to the features) of
``bcnn.ops.democratic_weights`` for each (n, d) shape on both routes of the second-order
kernel (``route="gram"``: K = (X X^T)^2 formed, ``route="factored"``: K v as
x_i^T (sum_j v_j x_j x_j^T) x_i), and states which one ``route="auto"`` picks
(``bcnn.ops.democratic.factored_is_cheaper``) and whether it is the faster. The shapes
cover the built-in dataset's small CNN (1024 locations of 64 channels), VGG-D at 224 and
448 (196 / 784 locations of 512 channels) and the region around the rule's threshold.
Writes ``<out>.csv`` and ``<out>.md`` with the device, date and command.

Usage:
    python scripts/bench_democratic.py [--device cpu] [--batch 32] [--threads 2]
        [--shapes 1024x64 196x512 ...] [--out benchmarks/results/democratic_cpu]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import benchlib as bench
import torch

from bcnn.ops.democratic import FACTORED_RATIO, democratic_weights, factored_is_cheaper

SHAPES = ("1024x64", "1024x128", "1024x256", "3136x64", "784x128", "784x512", "256x64")
SHAPES += ("196x32", "196x64", "196x512")
ROUTES = ("gram", "factored")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10, help="Sinkhorn iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="n x d, e.g. 196x512")
    parser.add_argument("--budget-s", type=float, default=2.0, help="timing budget per route")
    parser.add_argument("--out", default="benchmarks/results/democratic_cpu")
    return parser.parse_args(argv)


def time_shape(n: int, d: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Seconds of forward + backward on both routes at (n, d), and the auto route's pick."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    X = torch.randn(args.batch, n, d, generator=gen).relu().to(device)
    row: dict = {"n": n, "d": d, "d2_over_n": d * d / n}
    for route in ROUTES:
        x = X.clone().requires_grad_()

        def step(x: torch.Tensor = x, route: str = route) -> None:
            x.grad = None
            democratic_weights(x, iters=args.iters, route=route).sum().backward()

        step()  # warm-up
        row[f"{route}_ms"] = 1e3 * bench.measure(step, device, budget_s=args.budget_s).best
    row["factored_speedup"] = row["gram_ms"] / row["factored_ms"]
    row["auto"] = "factored" if factored_is_cheaper(n, d) else "gram"
    fastest = "factored" if row["factored_ms"] < row["gram_ms"] else "gram"
    row["auto_is_fastest"] = row["auto"] == fastest
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the benchmark; returns its rows (also written to ``--out``)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = bench.RunInfo.start(__file__, argv, device)
    rows = []
    for shape in args.shapes:
        n, d = (int(v) for v in shape.lower().split("x"))
        rows.append(time_shape(n, d, args, device))
        print(rows[-1], flush=True)
    info.finish()
    out = Path(args.out)
    bench.write_csv(out.with_suffix(".csv"), rows, meta=info.meta())
    columns = {
        "n": "n",
        "d": "d",
        "d2_over_n": "d^2 / n",
        "gram_ms": "gram ms",
        "factored_ms": "factored ms",
        "factored_speedup": "gram / factored",
        "auto": "auto picks",
        "auto_is_fastest": "auto is the faster",
    }
    body = [
        f"Forward + backward of `democratic_weights` (second order, {args.iters} Sinkhorn "
        f"iterations) on relu(randn) features of shape ({args.batch}, n, d), float32; best "
        f"run. `auto` takes the factored route where d^2 <= {FACTORED_RATIO} n.",
        "",
        *bench.markdown_table(
            rows, columns, dict.fromkeys(("d2_over_n", "gram_ms", "factored_ms"), ".1f")
        ),
    ]
    bench.write_markdown(out.with_suffix(".md"), "gamma-democratic weights: routes", info, body)
    print(f"written {out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
