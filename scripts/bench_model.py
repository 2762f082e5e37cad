"""Time per image of each pooling head on VGG-D at 448, and its share of a training step.

For every head (pooling + normalization chain + a 200-class linear classifier, built from
the configs like a training run) it measures, per image:

* the head alone on a fixed relu5_3-sized map (B, 512, 28, 28): forward, and forward plus
  backward down to the map (cross-entropy loss);
* the whole model (random VGG-D weights): forward, and forward plus backward;

and the backbone alone once. The head's share of a training step is
head_fwdbwd / (backbone_fwdbwd + head_fwdbwd) (precise: the head is timed on its own) and,
as a cross-check, 1 - backbone_fwdbwd / model_fwdbwd (noisy on a shared CPU).
Writes ``<out>/model_heads_<cpu|gpu>.csv`` and ``.md`` and the "Model heads" section of
``<out>/README.md``. ``--deadline-s`` caps the time: every head is measured once, repeats
stop at the deadline.

Usage:
    python scripts/bench_model.py [--device cpu] [--batch 2] [--repeats 2] [--size 448]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import benchlib as bench
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

import bcnn.config  # noqa: F401  (registers the train_schema the root config extends)
from bcnn.models import build_model

# name -> (overrides, description). The sum rows use the published chains.
HEADS: dict[str, tuple[list[str], str]] = {
    "avg": (["pooling=avg", "normalization=l2"], "average pooling + L2 (first order)"),
    "sum": (["pooling=sum", "normalization=signsqrt_l2"], "B-CNN: sum + signed sqrt + L2"),
    "sqrt_ns": (
        ["pooling=sum", "normalization=sqrt_signsqrt_l2"],
        "sum + matrix sqrt (5 Newton-Schulz, iterative Lyapunov backward) + signed sqrt + L2",
    ),
    "log": (["pooling=sum", "normalization=log_l2"], "sum + matrix log (eigh) + L2"),
    "democratic": (
        ["pooling=democratic", "normalization=signsqrt_l2"],
        "gamma-democratic (gamma 0.5, 10 Sinkhorn iterations) + signed sqrt + L2",
    ),
    "spectral": (
        ["pooling=spectral", "normalization=signsqrt_l2"],
        "spectral p=0.5 (Newton-Schulz, the config default) + signed sqrt + L2",
    ),
    "spectral_p03": (
        ["pooling=spectral", "normalization.mpow.p=0.3", "normalization=signsqrt_l2"],
        "spectral p=0.3 (eigh, powm) + signed sqrt + L2",
    ),
    "compact": (
        ["pooling=compact", "normalization=signsqrt_l2"],
        "Tensor Sketch 8192 + signed sqrt + L2",
    ),
}
NUM_CLASSES = 200


def head_functions(
    model: torch.nn.Module,
    feats: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: torch.autocast,
) -> dict[str, Callable[[], None]]:
    """The timed callables of one head.

    Args:
        model: A ``BilinearModel``.
        feats: Fixed backbone map (B, C, H, W) with ``requires_grad``: the head alone runs
            on it, its backward ends there.
        x: Images (B, 3, S, S) for the whole model.
        y: Labels (B,).
        autocast: The precision context.

    Returns:
        ``pool_fwd`` / ``pool_step`` (pooling + normalization; backward of a random linear
        function of the descriptor), ``head_fwd`` / ``head_step`` (+ classifier and
        cross-entropy) and ``model_fwd`` / ``model_step`` (the whole model).
    """

    def descriptor() -> torch.Tensor:
        with autocast:
            return model.normalization(model.pooling(feats))

    with torch.no_grad():
        probe = torch.randn_like(descriptor().float())

    def pool_fwd() -> None:
        with torch.no_grad():
            descriptor()

    def pool_step() -> None:
        model.zero_grad(set_to_none=True)
        feats.grad = None
        (descriptor().float() * probe).sum().backward()

    def head_fwd() -> None:
        with torch.no_grad(), autocast:
            model.classifier(descriptor())

    def head_step() -> None:
        model.zero_grad(set_to_none=True)
        feats.grad = None
        with autocast:
            logits = model.classifier(descriptor())
        F.cross_entropy(logits.float(), y).backward()

    def model_fwd() -> None:
        with torch.no_grad(), autocast:
            model(x)

    def model_step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()

    return {
        "pool_fwd": pool_fwd,
        "pool_step": pool_step,
        "head_fwd": head_fwd,
        "head_step": head_step,
        "model_fwd": model_fwd,
        "model_step": model_step,
    }


PARTS = ("pool_fwd", "pool_step", "head_fwd", "head_step", "model_fwd", "model_step")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed training steps (fastest kept)"
    )
    parser.add_argument(
        "--fwd-repeats", type=int, default=1, help="timed forward-only runs of the whole model"
    )
    parser.add_argument(
        "--head-repeats", type=int, default=10, help="timed runs of the head alone (fastest kept)"
    )
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--heads", nargs="*", default=list(HEADS), choices=list(HEADS))
    parser.add_argument(
        "--backbone", default="vgg_d", help="backbone config (vgg_d; small for a quick check)"
    )
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="stop repeating after this many seconds (every head is still measured once)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args(argv)


@dataclass
class Measured:
    """The measurements of one run: per-head rows and the backbone alone (ms per image)."""

    rows: list[dict]
    backbone_fwd_ms: float
    backbone_step_ms: float
    map_shape: tuple[int, ...]
    head_rounds: int
    step_rounds: int


def measure(args: argparse.Namespace, device: torch.device) -> Measured:
    """Times the backbone alone and every head (alone and in the whole model)."""
    torch.manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    deadline = bench.Deadline(args.deadline_s)

    def configured(overrides: list[str]):
        with initialize_config_module("bcnn.configs", version_base="1.3"):
            return compose("train", overrides=[f"backbone={args.backbone}", *overrides])

    def once(fn: Callable[[], object]) -> float:
        return bench.time_runs(fn, device, runs=1, warmup=0).best

    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(NUM_CLASSES, (args.batch,), device=device)
    backbone = build_model(configured(HEADS["avg"][0]), NUM_CLASSES).backbone.to(device)

    def backbone_fwd() -> None:
        with torch.no_grad(), autocast:
            backbone(x)

    def backbone_step() -> None:
        backbone.zero_grad(set_to_none=True)
        with autocast:
            out = backbone(x)
        out.float().mean().backward()

    per_image = 1000.0 / args.batch  # seconds per batch -> ms per image
    bb_fwd = bench.time_runs(backbone_fwd, device, runs=args.repeats).best * per_image
    # Backbone steps are timed again next to every model step (interleaved, so that both
    # see the same machine load); the fastest of all is the backbone's cost.
    bb_steps = [bench.time_runs(backbone_step, device, runs=args.repeats).best]
    with torch.no_grad():
        fmap = backbone(x).detach()
    print(f"backbone: fwd {bb_fwd:.1f} ms/img, map {tuple(fmap.shape)}")

    # One model per head, sharing the backbone (same weights, warm kernels).
    fns: dict[str, dict[str, Callable[[], None]]] = {}
    dims: dict[str, int] = {}
    for name in args.heads:
        model = build_model(configured(HEADS[name][0]), NUM_CLASSES).to(device)
        model.backbone = backbone
        torch.nn.init.normal_(model.classifier.weight, std=0.01)
        dims[name] = model.descriptor_shape.numel
        fns[name] = head_functions(model, fmap.clone().requires_grad_(True), x, y, autocast)

    # Every head's functions are timed round-robin, so that all heads see the same mix of
    # machine load; the first round is a warm-up.
    times: dict[tuple[str, str], list[float]] = {}
    head_rounds = 0
    for round_ in range(args.head_repeats + 1):
        if round_ > 1 and deadline.expired():
            break
        for name in args.heads:
            for part in PARTS[:4]:
                elapsed = once(fns[name][part])
                if round_:
                    times.setdefault((name, part), []).append(elapsed)
        head_rounds = round_
    # Whole-model steps, interleaved with backbone-only steps. No warm-up: the backbone's
    # and the heads' kernels have just run on these shapes, and a VGG-D pass at 448 costs
    # seconds on a CPU.
    for round_ in range(args.fwd_repeats):
        if round_ and deadline.expired():
            break
        for name in args.heads:
            times.setdefault((name, "model_fwd"), []).append(once(fns[name]["model_fwd"]))
    step_rounds = 0
    for round_ in range(args.repeats):
        if round_ and deadline.expired():
            break
        for name in args.heads:
            bb_steps.append(once(backbone_step))
            times.setdefault((name, "model_step"), []).append(once(fns[name]["model_step"]))
        step_rounds = round_ + 1

    def best(name: str, part: str) -> float:
        return min(times[(name, part)]) * per_image

    bb_step = min(bb_steps) * per_image
    print(f"backbone: fwd+bwd {bb_step:.1f} ms/img (fastest of {len(bb_steps)})")
    rows = []
    for name in args.heads:
        overrides, description = HEADS[name]
        p_fwd, p_step, h_fwd, h_step, m_fwd, m_step = (best(name, part) for part in PARTS)
        rows.append(
            {
                "head": name,
                "description": description,
                "overrides": " ".join(overrides),
                "descriptor_dim": dims[name],
                "pool_norm_fwd_ms": round(p_fwd, 2),
                "pool_norm_fwdbwd_ms": round(p_step, 2),
                "head_fwd_ms": round(h_fwd, 2),
                "head_fwdbwd_ms": round(h_step, 2),
                "model_fwd_ms": round(m_fwd, 1),
                "model_fwdbwd_ms": round(m_step, 1),
                "backbone_fwd_ms": round(bb_fwd, 1),
                "backbone_fwdbwd_ms": round(bb_step, 1),
                "head_share_pct": round(100 * h_step / (bb_step + h_step), 2),
                "measured_share_pct": round(100 * (1 - bb_step / m_step), 1),
            }
        )
    for r in rows:
        print(
            f"{r['head']:>13}: pool+norm fwd {r['pool_norm_fwd_ms']:7.2f} fwd+bwd "
            f"{r['pool_norm_fwdbwd_ms']:7.2f} | head fwd {r['head_fwd_ms']:7.2f} fwd+bwd "
            f"{r['head_fwdbwd_ms']:7.2f} | model fwd {r['model_fwd_ms']:7.1f} fwd+bwd "
            f"{r['model_fwdbwd_ms']:7.1f} ms/img | share {r['head_share_pct']:.2f}% "
            f"(measured {r['measured_share_pct']:.1f}%)"
        )
    return Measured(rows, bb_fwd, bb_step, tuple(fmap.shape[1:]), head_rounds, step_rounds)


def report(args: argparse.Namespace, info: bench.RunInfo, measured: Measured) -> Path:
    """Writes ``model_heads_<tag>.csv`` and ``.md`` and the README's "Model heads" section.

    Returns:
        The CSV file.
    """
    tag = "cpu" if info.device.type == "cpu" else "gpu"
    meta = {
        **{k: v for k, v in info.meta().items() if k in ("device", "date", "command")},
        "versions": info.meta()["versions"],
        "batch": args.batch,
        "size": args.size,
        "precision": args.precision,
        "backbone": args.backbone,
    }
    csv_path = bench.write_csv(args.out / f"model_heads_{tag}.csv", measured.rows, meta=meta)
    rows, bb_fwd, bb_step = measured.rows, measured.backbone_fwd_ms, measured.backbone_step_ms
    setup = [
        f"- precision {args.precision}; {args.backbone} (random weights) at "
        f"{args.size}x{args.size}, batch {args.batch}, {NUM_CLASSES}-class linear classifier, "
        "cross-entropy loss, gradients zeroed each step; heads timed round-robin, fastest of "
        f"{measured.head_rounds} rounds after a warm-up round (head alone), of "
        f"{measured.step_rounds} training steps and {args.fwd_repeats} forward pass(es) (whole "
        "model; backbone steps interleaved with the model's, fastest of all); times in ms per "
        "image.",
    ]
    table = [
        "| head | descriptor | pool+norm fwd | pool+norm fwd+bwd | head fwd | head fwd+bwd | "
        "model fwd | model fwd+bwd | head share of a step | measured share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| backbone alone | - | - | - | - | - | {bb_fwd:.0f} | {bb_step:.0f} | - | - |",
    ]
    for r in rows:
        table.append(
            f"| {r['head']} | {r['descriptor_dim']} | {r['pool_norm_fwd_ms']:.1f} | "
            f"{r['pool_norm_fwdbwd_ms']:.1f} | {r['head_fwd_ms']:.1f} | "
            f"{r['head_fwdbwd_ms']:.1f} | {r['model_fwd_ms']:.0f} | {r['model_fwdbwd_ms']:.0f} | "
            f"{r['head_share_pct']:.1f}% | {r['measured_share_pct']:.1f}% |"
        )
    legend = [f"- `{r['head']}`: {r['description']} (`{r['overrides']}`)" for r in rows]
    body = [
        *setup,
        "",
        *table,
        "",
        f"Head = pooling + normalization + the {NUM_CLASSES}-class linear classifier + "
        "loss; pool+norm = pooling and normalization alone (backward of a random linear "
        "function of the descriptor). With 262144-dimensional descriptors the head includes "
        "a classifier of 52M weights and their gradient.\nHead share of a step = "
        "head fwd+bwd / (backbone fwd+bwd + head fwd+bwd), the "
        f"head timed alone on a fixed {'x'.join(map(str, measured.map_shape))} map; measured "
        "share = 1 - backbone fwd+bwd / model fwd+bwd (the difference of two noisy numbers: "
        "a cross-check only).",
        "",
        *legend,
    ]
    title = f"Pooling heads on {args.backbone} ({tag.upper()})"
    md_path = bench.write_markdown(args.out / f"model_heads_{tag}.md", title, info, body)
    bench.update_readme_section(args.out / "README.md", "Model heads", readme_section(args.out))
    print(f"wrote {csv_path}, {md_path} and the Model heads section of {args.out / 'README.md'}")
    return csv_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = bench.RunInfo.start(__file__, argv, device)
    measured = measure(args, device)
    report(args, info.finish(), measured)
    return 0


def readme_section(out: Path) -> str:
    """The README's "Model heads" section from the CSV files present in ``out``."""
    parts = ["## Model heads\n"]
    for tag in ("cpu", "gpu"):
        path = out / f"model_heads_{tag}.csv"
        if not path.exists():
            continue
        meta, rows = bench.read_csv(path)
        by = {r["head"]: r for r in rows}
        shares = ", ".join(f"{r['head']} {float(r['head_share_pct']):.1f}%" for r in rows)
        first = rows[0]
        backbone = {"vgg_d": "VGG-D"}.get(meta.get("backbone", "vgg_d"), meta.get("backbone"))
        parts.append(
            f"{tag.upper()} ({meta['device']}, batch {meta['batch']}, {meta['size']}px, "
            f"{meta['date']}): {backbone} alone takes {float(first['backbone_fwdbwd_ms']):.0f} ms "
            "per image for forward+backward; head share of a training step: "
            f"{shares}."
            + (
                " Forward+backward per image of the pooling and normalization alone: sum "
                f"pooling + signed sqrt + L2 {float(by['sum']['pool_norm_fwdbwd_ms']):.0f} ms, "
                "with the five-iteration Newton-Schulz square root "
                f"{float(by['sqrt_ns']['pool_norm_fwdbwd_ms']):.0f} ms."
                if "sum" in by and "sqrt_ns" in by
                else ""
            )
            + f" Command: `{meta['command']}`.\n"
        )
    if not (out / "model_heads_gpu.csv").exists():
        parts.append(
            "GPU targets (batch 32, VGG-D at 448, forward+backward): spectral head <= 5% of "
            "the training step, sum head <= 2%. **NOT yet measured on a GPU**: `make bench-gpu` "
            "runs `python scripts/bench_model.py --device cuda --batch 32 --repeats 10` (writes "
            "`model_heads_gpu.*`). On the CPU the matrix functions use LAPACK, whose "
            "relative cost says little about cuSOLVER/GEMM on a GPU.\n"
        )
    tags = [tag for tag in ("cpu", "gpu") if (out / f"model_heads_{tag}.csv").exists()]
    parts.append(
        "Tables: "
        + ", ".join(f"[model_heads_{t}.md](model_heads_{t}.md)" for t in tags)
        + "; raw numbers: "
        + ", ".join(f"[model_heads_{t}.csv](model_heads_{t}.csv)" for t in tags)
        + ".\n"
    )
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
