"""Training and inference throughput of a model config, and the cached linear stage.

Measures, for a model composed from the configs like a training run (random weights,
random images of ``--size``):

* training images/s (forward, backward and SGD step of every parameter: fine-tuning) and
  inference images/s (forward in eval mode), at ``--precision`` (autocast);
* the head's share of a training step: 1 - (backbone-only step) / (full step);
* the model FLOPs per training image (``torch.utils.flop_counter``) and, on a GPU whose
  dense bf16 peak is known, the model FLOPs utilization (MFU);
* the linear stage with and without the feature cache: one feature-extraction pass over
  ``--cache-images`` images versus 25 epochs of classifier training from the cache
  (target: extraction + 25 cached epochs <= 1.5x one pass; without the cache the stage
  costs 25 passes). Backbone calls are counted during the extraction, during the 25 epochs
  and during a second ``build_cache`` with the same key (which must reuse the cache).

Writes ``<out>/training_<device>.csv``, ``training_<device>_cache.csv`` and
``training_<device>.md`` (device, date, command) and the "Training throughput" section of
``<out>/README.md``.

Usage:
    python scripts/bench_training.py --device cuda --precision bf16 --batch 32
    python scripts/bench_training.py --device cpu --batch 2 --size 448 --steps 2
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import benchlib as bench
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import bcnn.config  # noqa: F401  (registers the schema)
from bcnn.engine import distributed as D
from bcnn.engine.cache import CachedViews, ViewAverage, build_cache
from bcnn.engine.loops import autocast, train_one_epoch
from bcnn.models import build_model

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
CACHED_EPOCHS = 25

MODELS = {
    "vgg_d_bcnn": ["backbone=vgg_d", "pooling=sum", "normalization=signsqrt_l2"],
    "vgg_d_sqrt": ["backbone=vgg_d", "pooling=sum", "normalization=sqrt_signsqrt_l2"],
    "small_bcnn": ["backbone=small", "pooling=sum", "normalization=signsqrt_l2"],
}
MODEL_FIELDS = [
    "model", "overrides", "size", "batch", "precision", "train_img_s", "infer_img_s",
    "step_ms", "infer_ms", "backbone_step_ms", "head_share_pct", "gflop_per_img",
    "peak_tflops", "mfu_pct",
]  # fmt: skip
CACHE_FIELDS = [
    "model", "images", "size", "batch", "extract_pass_s", "cached_25_epochs_s",
    "cached_stage_over_one_pass", "uncached_stage_over_one_pass", "extract_backbone_calls",
    "epoch_backbone_calls", "reuse_backbone_calls", "epoch_images",
]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["vgg_d_bcnn"], choices=sorted(MODELS))
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--precision", default="bf16", choices=["32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (their mean is kept)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cache-model", default="vgg_d_bcnn", choices=sorted(MODELS))
    parser.add_argument("--cache-images", type=int, default=512)
    parser.add_argument("--cache-size", type=int, default=448)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=bench.CLOCKS,
        default="wall",
        help="wall time, or the process's CPU time (CPU only; with --threads 1 it does not "
        "depend on other jobs of a shared machine)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="after this many seconds measure no further model (the cache stage and the "
        "first model always run)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        parser.error("--clock cpu counts this process's CPU time: use --clock wall on a GPU")
    return args


def peak_flops(device: torch.device) -> float:
    """The device's dense bf16 peak (FLOP/s), NaN where unknown (CPUs included)."""
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), math.nan)


def compose_model(name: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        cfg = compose("train", overrides=MODELS[name])
    torch.manual_seed(0)
    return build_model(cfg, args.classes).to(device)


def bench_model(name: str, args: argparse.Namespace) -> dict:
    """Throughput, head share, FLOPs and MFU of one model config."""
    device = torch.device(args.device)
    model = compose_model(name, args, device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    x = x.to(device)
    y = torch.randint(args.classes, (args.batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_step() -> None:
        with autocast(device, args.precision):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def backbone_step() -> None:
        with autocast(device, args.precision):
            out = model.backbone(model.normalize_input(x))
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer() -> None:
        with autocast(device, args.precision):
            model(x)

    def mean_seconds(fn) -> float:
        timing = bench.time_runs(
            fn, device, runs=1, number=args.steps, warmup=args.warmup, clock_kind=args.clock
        )
        return timing.mean

    model.train()
    t_train = mean_seconds(train_step)
    t_backbone = mean_seconds(backbone_step)
    with FlopCounterMode(display=False) as counter:
        train_step()
    flops = counter.get_total_flops()
    model.eval()
    t_infer = mean_seconds(infer)
    peak = peak_flops(device)
    return {
        "model": name,
        "overrides": " ".join(MODELS[name]),
        "size": args.size,
        "batch": args.batch,
        "precision": args.precision,
        "train_img_s": args.batch / t_train,
        "infer_img_s": args.batch / t_infer,
        "step_ms": 1000 * t_train,
        "infer_ms": 1000 * t_infer,
        "backbone_step_ms": 1000 * t_backbone,
        "head_share_pct": 100 * max(0.0, 1 - t_backbone / t_train),
        "gflop_per_img": flops / args.batch / 1e9,
        "peak_tflops": peak / 1e12,
        "mfu_pct": 100 * flops / t_train / peak,
    }


class CallCounter:
    """Counts the forward calls of a module (a forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1


def bench_cache(args: argparse.Namespace) -> dict:
    """One extraction pass vs the cached linear stage (extraction + 25 epochs)."""
    device = torch.device(args.device)
    model = compose_model(args.cache_model, args, device).eval()
    backbone = CallCounter(model.backbone)
    n = args.cache_images
    images = torch.randint(0, 256, (n, 3, args.cache_size, args.cache_size), dtype=torch.uint8)
    labels = torch.randint(args.classes, (n,))
    data = TensorDataset(images, labels)
    now = bench.clock(device, args.clock)
    with tempfile.TemporaryDirectory() as tmp:

        def cache() -> tuple:
            return build_cache(
                model, data, Path(tmp), {"bench": True}, views=1, dtype="float16",
                batch_size=args.batch, device=device, precision=args.precision, num_workers=0,
                env=D.DistEnv(),
            )  # fmt: skip

        start = now()
        feats, labs = cache()
        t_extract = now() - start
        extract_calls = backbone.calls
        head = ViewAverage(model.classifier)
        opt = torch.optim.SGD(head.parameters(), lr=1.0, momentum=0.9)
        cached = CachedViews(feats, labs, train=True, shape=model.descriptor_shape.dims)
        loader = DataLoader(cached, batch_size=64, shuffle=True)
        seen = 0
        start = now()
        for _ in range(CACHED_EPOCHS):
            seen += train_one_epoch(head, loader, opt, device, precision=args.precision).seen
        t_epochs = now() - start
        epoch_calls = backbone.calls - extract_calls
        cache()  # the same key: the second stage of a run reuses the descriptors
        reuse_calls = backbone.calls - extract_calls - epoch_calls
    return {
        "model": args.cache_model,
        "images": n,
        "size": args.cache_size,
        "batch": args.batch,
        "extract_pass_s": t_extract,
        "cached_25_epochs_s": t_epochs,
        "cached_stage_over_one_pass": (t_extract + t_epochs) / t_extract,
        "uncached_stage_over_one_pass": float(CACHED_EPOCHS),
        "extract_backbone_calls": extract_calls,
        "epoch_backbone_calls": epoch_calls,
        "reuse_backbone_calls": reuse_calls,
        "epoch_images": seen,
    }


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """The model rows (until ``--deadline-s``; the first always) and the cache row."""
    deadline = bench.Deadline(args.deadline_s)
    cache = bench_cache(args)
    print({k: round(v, 2) if isinstance(v, float) else v for k, v in cache.items()}, flush=True)
    rows = []
    for name in args.models:
        if rows and deadline.expired():
            print(f"--deadline-s {args.deadline_s} reached: {name} not measured")
            continue
        rows.append(bench_model(name, args))
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()})
    return rows, cache


MODEL_COLUMNS = {
    "model": "model",
    "precision": "precision",
    "size": "size",
    "batch": "batch",
    "train_img_s": "train img/s",
    "infer_img_s": "infer img/s",
    "step_ms": "step ms",
    "backbone_step_ms": "backbone step ms",
    "head_share_pct": "head share %",
    "gflop_per_img": "GFLOP/img (train)",
    "mfu_pct": "MFU %",
}
CACHE_COLUMNS = {
    "model": "model",
    "images": "images",
    "size": "size",
    "extract_pass_s": "one extraction pass s",
    "cached_25_epochs_s": f"{CACHED_EPOCHS} cached epochs s",
    "cached_stage_over_one_pass": "cached stage / one pass",
    "uncached_stage_over_one_pass": "uncached stage / one pass",
    "extract_backbone_calls": "backbone calls: extraction",
    "epoch_backbone_calls": "in the epochs",
    "reuse_backbone_calls": "second build_cache",
}


def report(args: argparse.Namespace, info: bench.RunInfo, rows: list[dict], cache: dict) -> None:
    """Writes the CSV and Markdown files and the README's "Training throughput" section."""
    stem = args.out / f"training_{info.device.type}"
    meta = {k: v for k, v in info.meta().items() if k != "versions"} | {"clock": args.clock}
    bench.write_csv(f"{stem}.csv", rows, MODEL_FIELDS, meta)
    bench.write_csv(f"{stem}_cache.csv", [cache], CACHE_FIELDS, meta)
    channels_last = ", channels_last" if args.channels_last else ""
    body = [
        f"Random weights and uint8 images; {args.steps} timed steps after {args.warmup} "
        f"warm-up steps (mean, {args.clock} clock){channels_last}. Training step: forward, "
        "cross-entropy, backward and an SGD step of every parameter; head share = 1 - "
        "backbone-only step / full step; "
        "MFU = model FLOPs of a training step (torch.utils.flop_counter) / step time / the "
        "device's dense bf16 peak (known GPUs only).",
        "",
        *bench.markdown_table(rows, MODEL_COLUMNS),
        "",
        "## Linear stage from the feature cache",
        "",
        *bench.markdown_table([cache], CACHE_COLUMNS),
        "",
        "Target: `cached_stage_over_one_pass` <= 1.5 (one extraction pass plus "
        f"{CACHED_EPOCHS} epochs on the cache, relative to one pass; the uncached stage costs "
        f"{CACHED_EPOCHS} passes). The backbone runs once per batch during the extraction and "
        "never afterwards: not in the epochs, not when the second stage asks for the same cache.",
    ]
    title = f"Training throughput ({info.device.type})"
    bench.write_markdown(f"{stem}.md", title, info, body)
    bench.update_readme_section(
        args.out / "README.md", "Training throughput", readme_section(args.out)
    )
    print(f"wrote {stem}.csv, {stem}_cache.csv, {stem}.md and {args.out / 'README.md'}")


def readme_section(out: Path) -> str:
    """The README's "Training throughput" section from the result files present in ``out``."""
    parts = ["## Training throughput\n"]
    for device in ("cpu", "cuda"):
        if not (out / f"training_{device}.csv").exists():
            continue
        meta, rows = bench.read_csv(out / f"training_{device}.csv")
        _, (cache,) = bench.read_csv(out / f"training_{device}_cache.csv")
        models = "; ".join(
            f"{r['model']} (precision {r['precision']}, batch {r['batch']}, {r['size']} px) "
            "trains at "
            f"{float(r['train_img_s']):.2f} images/s and infers at "
            f"{float(r['infer_img_s']):.2f}, head {float(r['head_share_pct']):.1f}% of a step"
            + (
                f", MFU {float(r['mfu_pct']):.1f}%"
                if r.get("mfu_pct") and not math.isnan(float(r["mfu_pct"]))
                else ""
            )
            for r in rows
        )
        setting = (
            f"{meta.get('device', '?')}, torch threads {meta.get('torch threads', '?')}, "
            f"{meta.get('clock', 'wall')} clock, load average "
            f"{meta.get('load average at start (1/5/15 min)', '?').split(' / ')[0]} at start, "
            f"{meta.get('date', '?')}"
        )
        parts.append(
            f"{device.upper()} ({setting}): {models}. "
            f"The cached linear stage on {cache['images']} images of {cache['size']} px "
            f"({cache['model']}): one extraction pass {float(cache['extract_pass_s']):.1f} s, "
            f"{CACHED_EPOCHS} epochs from the cache {float(cache['cached_25_epochs_s']):.1f} s, "
            f"so the whole cached stage costs **{float(cache['cached_stage_over_one_pass']):.2f}x "
            f"one pass** (target <= 1.5x; uncached it costs {CACHED_EPOCHS} passes). "
            f"Command: `{meta.get('command', '?')}`. The head share is the difference of two "
            "step times (full and backbone-only), within their noise when small: "
            "`bench_model.py` times the head alone.\n"
        )
        parts.append(
            f"Tables: [training_{device}.md](training_{device}.md), raw numbers: "
            f"[training_{device}.csv](training_{device}.csv), "
            f"[training_{device}_cache.csv](training_{device}_cache.csv).\n"
        )
    if not (out / "training_cuda.csv").exists():
        parts.append(
            "GPU targets, **not yet measured**: H100/H200, bf16, VGG-D B-CNN at 448: >= 40% MFU "
            "and head <= 5% of the step; the cached stage <= 1.5x one pass. `make bench-gpu` "
            "runs `python scripts/bench_training.py --device cuda --precision bf16 --batch 32 "
            "--channels-last`. MFU needs a GPU (the CPU has no bf16 peak here).\n"
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = bench.RunInfo.start(__file__, argv, device)
    rows, cache = measure(args)
    report(args, info.finish(), rows, cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
