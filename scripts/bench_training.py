"""Training and inference throughput of a model config, and the cached linear stage.

Measures, for a model composed from the configs like a training run (random weights,
random images of ``--size``):

* training images/s (forward, backward and SGD step of every parameter: fine-tuning) and
  inference images/s (forward in eval mode), at ``--precision`` (autocast);
* the head's share of a training step: 1 - (backbone-only step) / (full step);
* on CUDA, the model FLOPs per training image (``torch.utils.flop_counter``) and the
  model FLOPs utilization (MFU) against the device's dense bf16 peak;
* the linear stage with and without the feature cache: one feature-extraction pass over
  ``--cache-images`` images versus 25 epochs of classifier training from the cache
  (target: extraction + 25 cached epochs <= 1.5x one pass; without the cache the stage
  costs 25 passes).

Writes ``<out>/training_<device>.csv`` and ``.md`` with device, date and command.

Usage:
    python scripts/bench_training.py --device cuda --precision bf16 --batch 32
    python scripts/bench_training.py --device cpu --batch 2 --size 448 --steps 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from torch.utils.data import DataLoader, TensorDataset

import bcnn.config  # noqa: F401  (registers the schema)
from bcnn.engine import distributed as D
from bcnn.engine.cache import CachedViews, ViewAverage, build_cache
from bcnn.engine.loops import autocast, train_one_epoch
from bcnn.models import build_model

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}

MODELS = {
    "vgg_d_bcnn": ["backbone=vgg_d", "pooling=sum", "normalization=signsqrt_l2"],
    "vgg_d_sqrt": ["backbone=vgg_d", "pooling=sum", "normalization=sqrt_signsqrt_l2"],
    "small_bcnn": ["backbone=small", "pooling=sum", "normalization=signsqrt_l2"],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def bench_model(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    """Throughput, head share and MFU of one model config."""
    device = torch.device(args.device)
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg, args.classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    x = x.to(device)
    if args.channels_last:
        model.channels_last = True
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

    model.train()
    t_train = _time(train_step, device, args.steps, args.warmup)
    t_backbone = _time(backbone_step, device, args.steps, args.warmup)
    model.eval()
    t_infer = _time(infer, device, args.steps, args.warmup)
    row = {
        "model": name,
        "overrides": " ".join(overrides),
        "size": args.size,
        "batch": args.batch,
        "precision": args.precision,
        "train_img_s": args.batch / t_train,
        "infer_img_s": args.batch / t_infer,
        "step_ms": 1000 * t_train,
        "backbone_step_ms": 1000 * t_backbone,
        "head_share_pct": 100 * max(0.0, 1 - t_backbone / t_train),
    }
    peak = _peak(device)
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        model.train()
        with FlopCounterMode(display=False) as counter:
            train_step()
        flops = counter.get_total_flops()
        row["gflop_per_img"] = flops / args.batch / 1e9
        row["mfu_pct"] = 100 * flops / t_train / peak if peak else float("nan")
    return row


def bench_cache(args: argparse.Namespace) -> dict:
    """One extraction pass vs the cached linear stage (extraction + 25 epochs)."""
    device = torch.device(args.device)
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        cfg = compose("train", overrides=MODELS[args.cache_model])
    torch.manual_seed(0)
    model = build_model(cfg, args.classes).to(device).eval()
    n = args.cache_images
    images = torch.randint(0, 256, (n, 3, args.cache_size, args.cache_size), dtype=torch.uint8)
    labels = torch.randint(args.classes, (n,))
    data = TensorDataset(images, labels)
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        start = time.perf_counter()
        feats, labs = build_cache(
            model, data, Path(tmp), {"bench": True}, views=1, dtype="float16",
            batch_size=args.batch, device=device, precision=args.precision, num_workers=0,
            env=D.DistEnv(),
        )  # fmt: skip
        _sync(device)
        t_extract = time.perf_counter() - start
        head = ViewAverage(model.classifier)
        opt = torch.optim.SGD(head.parameters(), lr=1.0, momentum=0.9)
        shape = model.descriptor_shape.dims
        cached = CachedViews(feats, labs, train=True, shape=shape)
        loader = DataLoader(cached, batch_size=64, shuffle=True)
        start = time.perf_counter()
        for _ in range(25):
            train_one_epoch(head, loader, opt, device, precision=args.precision)
        _sync(device)
        t_epochs = time.perf_counter() - start
    return {
        "model": args.cache_model,
        "images": n,
        "size": args.cache_size,
        "extract_pass_s": t_extract,
        "cached_25_epochs_s": t_epochs,
        "cached_stage_over_one_pass": (t_extract + t_epochs) / t_extract,
        "uncached_stage_over_one_pass": 25.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["vgg_d_bcnn"], choices=sorted(MODELS))
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--precision", default="bf16", choices=["32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cache-model", default="vgg_d_bcnn", choices=sorted(MODELS))
    parser.add_argument("--cache-images", type=int, default=512)
    parser.add_argument("--cache-size", type=int, default=448)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    device = torch.device(args.device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    rows = [bench_model(m, MODELS[m], args) for m in args.models]
    for row in rows:
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    cache = bench_cache(args)
    print({k: round(v, 2) if isinstance(v, float) else v for k, v in cache.items()})

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"training_{device.type}"
    table = pd.DataFrame(rows)
    table.to_csv(f"{stem}.csv", index=False)
    pd.DataFrame([cache]).to_csv(f"{stem}_cache.csv", index=False)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    threads = torch.get_num_threads()
    lines = [
        f"# Training throughput ({device.type})",
        "",
        f"- Device: {label} ({threads} torch threads); torch {torch.__version__}",
        f"- Date: {date}",
        f"- Command: `{command}`",
        "",
        table.round(2).to_markdown(index=False),
        "",
        "## Linear stage from the feature cache",
        "",
        pd.DataFrame([cache]).round(2).to_markdown(index=False),
        "",
        "Target: `cached_stage_over_one_pass` <= 1.5 (one extraction pass plus 25 epochs "
        "on the cache, relative to one pass; the uncached stage costs 25 passes).",
    ]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv, {stem}_cache.csv and {stem}.md")


if __name__ == "__main__":
    main()
