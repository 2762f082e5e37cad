"""The exported model checked against the eager model in float64 (the exact value of its
function), on natural-statistics images at two sizes and on the run's own test images:
uniform noise hid a 4e-4 logit error on photographs (docs/deploy.md).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from torchvision.transforms.v2.functional import pil_to_tensor

from bcnn.config import instantiate
from bcnn.export.runtime import Predictor, from_export

log = logging.getLogger(__name__)

# Logit differences above this between the exported model and the exact value are
# reported (unless the float32 eager model is off by half as much itself).
TOL = 1e-4
# A graph with sizes baked in is this far off at another size: it runs only at its own.
FIXED_SIZE = 1e-2
DISCS = 300


def natural_images(size: int, count: int = 3, seed: int = 0) -> torch.Tensor:
    """Images with the statistics of photographs: the dead-leaves model.

    Opaque discs of random colour whose radii have density ~ r^-3 between size/64 and
    size/3 (scale invariance, the 1/f^2 power spectrum of photographs), under a smooth
    illumination field, with a little sensor noise.

    Args:
        size: Side in pixels.
        count: Number of images.
        seed: Generator seed (the same images every time).

    Returns:
        uint8 (count, 3, size, size).
    """
    gen = torch.Generator().manual_seed(seed)
    rmin, rmax = max(1.0, size / 64), size / 3
    leaves = []
    for background in torch.randint(256, (count, 3), generator=gen).tolist():
        image = Image.new("RGB", (size, size), tuple(background))
        draw = ImageDraw.Draw(image)
        for y, x, u, *colour in torch.rand(DISCS, 6, generator=gen).tolist():
            r = min(rmax, rmin / math.sqrt(max(u, 1e-6)))
            box = (x * size - r, y * size - r, x * size + r, y * size + r)
            draw.ellipse(box, fill=tuple(int(255 * c) for c in colour))
        leaves.append(pil_to_tensor(image))
    light = torch.rand(count, 1, 4, 4, generator=gen) * 0.8 + 0.6
    light = F.interpolate(light, size=(size, size), mode="bicubic", align_corners=False)
    images = torch.stack(leaves) / 255 * light + 0.02 * torch.randn(
        count, 3, size, size, generator=gen
    )
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def run_test_images(config: DictConfig, count: int = 3) -> tuple[list[torch.Tensor], str]:
    """Up to ``count`` images of the run's test split (evenly spaced), as the run
    evaluated them, and what they are; none, and why, when the data is not at hand."""
    try:
        dataset = instantiate(config.dataset, split="test", augment=False)
        picks = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).round()
        images = [dataset[int(i)][0] for i in picks]
    except Exception as err:  # missing data must not stop an export: the card says why
        return [], f"not checked: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return images, f"{len(images)} test images of the run"


def _compare(
    model: torch.nn.Module, exported: Predictor, images: list[torch.Tensor], input_dtype: str
) -> dict[str, Any]:
    """Largest logit differences on ``images`` (uint8 (3, H, W)), batched where equal."""
    same = len({tuple(im.shape) for im in images}) == 1
    logits: dict[str, list[torch.Tensor]] = {"out": [], "eager": [], "exact": []}
    with torch.no_grad():
        exact_model = copy.deepcopy(model).double()  # the exact value of the function
        for batch in [torch.stack(images)] if same else [im[None] for im in images]:
            inputs = batch.float() / 255 if input_dtype == "float" else batch
            logits["out"].append(exported.logits(batch).double())
            logits["eager"].append(model(inputs).double())
            logits["exact"].append(exact_model(inputs))
    out, eager, exact = (torch.cat(v) for v in logits.values())
    return {
        "size": list(images[0].shape[-2:]),
        "exported_vs_float64": float((out - exact).abs().max()),
        "eager_float32_vs_float64": float((eager - exact).abs().max()),
        "exported_vs_eager_float32": float((out - eager).abs().max()),
    }


def check(
    model: torch.nn.Module,
    meta: dict[str, Any],
    file: Path,
    config: DictConfig,
    input_dtype: str,
) -> dict[str, Any]:
    """The parity report of the written ``file`` against the eager ``model``.

    A graph that runs only at its export size (``meta["input"]["size"]``) is recorded in
    ``meta`` (input and notes). ``config``'s dataset gives the test images.

    Returns:
        ``at_size``, ``other_size`` and ``test_images`` rows (images, size, the largest
        differences), ``worst`` (the largest of the rows that ran) and ``fixed_size``; or
        ``checked: False`` and why (no onnxruntime).
    """
    try:
        exported = from_export(meta, file, torch.device("cpu"))
    except ImportError as err:
        log.warning("Exported model not checked: %s", err)
        return {"checked": False, "reason": str(err)}
    size = meta["input"]["size"][0]
    natural = "natural-statistics images (dead leaves)"
    other = size * 2 if size < 224 else size // 2
    sets = {
        "at_size": (list(natural_images(size)), natural),
        "other_size": (list(natural_images(other, seed=1)), natural),
        "test_images": run_test_images(config),
    }
    report: dict[str, Any] = {"checked": True, "reference": "the eager model in float64"}
    for key, (images, what) in sets.items():
        report[key] = {"images": what}
        try:
            report[key].update(_compare(model, exported, images, input_dtype) if images else {})
        except Exception as err:  # a graph with sizes baked in fails at another size
            if key == "at_size":
                raise
            log.info("The exported graph does not run at another size: %s", err)
            report[key].update(size=list(images[0].shape[-2:]), failed=True)
    at, off = report["at_size"], report["other_size"]
    bound = max(FIXED_SIZE, 2 * at["eager_float32_vs_float64"])
    report["fixed_size"] = off.get("failed", False) or off["exported_vs_float64"] > bound
    if report["fixed_size"]:
        meta["input"].update(fixed_size=[size, size], dynamic_axes=["batch"])
        meta["notes"].append(
            f"the exported graph runs only at {size}x{size}: resize images to that size "
            "(bcnn-predict does)"
        )
    ran = [report[k] for k in sets if "exported_vs_float64" in report[k]]
    worst = max(
        (r for r in ran if not report["fixed_size"] or r["size"] == at["size"]),
        key=lambda r: r["exported_vs_float64"],
    )
    report["worst"] = worst
    if worst["exported_vs_float64"] > max(TOL, 2 * worst["eager_float32_vs_float64"]):
        log.warning(
            "The exported model's logits differ from the exact value by up to %.3g on %s "
            "at %dx%d (the float32 eager model's by %.3g): see the model card",
            worst["exported_vs_float64"], worst["images"], *worst["size"],
            worst["eager_float32_vs_float64"],
        )  # fmt: skip
    return report


def parity_text(parity: dict[str, Any]) -> str:
    """The parity report as the model card's Markdown table, or why there was none."""
    if not parity.get("checked"):
        return f"Not checked after export ({parity.get('reason', 'no runtime')})."
    lines = [
        "Logits, largest absolute difference (reference: the eager model in float64):",
        "",
        "| images | size | exported vs float64 | eager float32 vs float64 | exported vs "
        "eager float32 |",
        "|---|---|---:|---:|---:|",
    ]
    keys = ("exported_vs_float64", "eager_float32_vs_float64", "exported_vs_eager_float32")
    for row in (parity["at_size"], parity["other_size"], parity["test_images"]):
        size = "x".join(map(str, row.get("size", [])))
        values = [f"{row[k]:.2e}" for k in keys if k in row]
        if row.get("failed"):
            values = ["the graph does not run at this size"]
        lines.append(f"| {row['images']} | {size} | {' | '.join(values)} |")
    worst = parity["worst"]
    lines.append(
        f"\nWorst case: {worst['exported_vs_float64']:.2e} from the exact value on "
        f"{worst['images']} at {worst['size'][0]}x{worst['size'][1]}, "
        f"{worst['exported_vs_eager_float32']:.2e} from the float32 eager model."
    )
    return "\n".join(lines)
