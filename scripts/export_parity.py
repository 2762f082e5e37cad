"""Export parity on photographs: ONNX Runtime and eager float32 logits against float64.

Usage (from the checkout root; needs onnx, onnxruntime and scikit-image, all in bcnn[dev])::

    PYTHONPATH=. python scripts/export_parity.py                 # the heads table
    PYTHONPATH=. python scripts/export_parity.py --stages         # where a graph loses it
    PYTHONPATH=. python scripts/export_parity.py --stages --eager-l2   # before the fix
    PYTHONPATH=. python scripts/export_parity.py --sizes 64 224 --case "pooling=avg"

Models are random-init (a random classifier gives logits of a trained model's size);
images are scikit-image's photographs (astronaut, coffee, chelsea) resized to each size.
``--stages`` exports the backbone, the pooling, each normalization step and the
classifier as graphs of their own, each fed the float64 output of the stage before, and
reports the largest error of each against float64 (relative for the backbone's map).
``--eager-l2`` exports the eager ``L2Normalize`` (onnxruntime's ReduceL2) instead of
``bcnn.export.graph.l2_normalize``: the graphs bcnn wrote before.
The results of docs/deploy.md ("Precision on photographs") come from this script.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bcnn.export import exportable
from bcnn.models import build_model
from bcnn.models.normalization import L2Normalize
from tests.conftest import compose_config

RESNET18 = ["backbone=timm", "backbone.name=resnet18"]
CASES = {
    "sum, signsqrt_l2": [],
    "sum, sqrt_l2 (auto: eigh on CPU)": ["normalization=sqrt_l2"],
    "sum, sqrt_signsqrt_l2 (Newton-Schulz)": ["normalization=sqrt_signsqrt_l2"],
    "sum, log_l2": ["normalization=log_l2"],
    "avg, l2": ["pooling=avg", "normalization=l2"],
    "democratic": ["pooling=democratic"],
    "compact": ["pooling=compact"],
    "spectral": ["pooling=spectral"],
    "sum, proj_dim=128, sqrt_l2 eigh": [
        "pooling.proj_dim=128",
        "normalization=sqrt_l2",
        "normalization.sqrt.method=eigh",
    ],
}


def photographs(size: int) -> torch.Tensor:
    """uint8 (3, 3, size, size): scikit-image's astronaut, coffee and chelsea."""
    from skimage import data

    names = ("astronaut", "coffee", "chelsea")
    images = [
        Image.fromarray(getattr(data, n)()).resize((size, size), Image.BILINEAR) for n in names
    ]
    return torch.from_numpy(np.stack([np.array(im) for im in images])).permute(0, 3, 1, 2)


def random_model(overrides: Sequence[str]) -> torch.nn.Module:
    cfg = compose_config([*RESNET18, *overrides], Path("outputs/export_parity"))
    torch.manual_seed(0)
    model = build_model(cfg, 5).eval()
    gen = torch.Generator().manual_seed(1)
    for param in model.classifier.parameters():
        param.data = torch.randn(param.shape, generator=gen) * (5.0 if param.dim() > 1 else 0.1)
    return model.requires_grad_(False)


def onnx_run(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Exports ``module`` at ``x`` (batch, height and width dynamic) and runs onnxruntime."""
    import onnxruntime as ort

    class Wrap(torch.nn.Module):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return module(inp)

    buffer = io.BytesIO()
    axes = {0: "b", 2: "h", 3: "w"} if x.dim() == 4 else {0: "b"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrap(), (x,), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": axes})  # fmt: skip
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max())


def export_graph(model: torch.nn.Module, eager_l2: bool) -> torch.nn.Module:
    graph, _ = exportable(model)
    if eager_l2 and "l2" in graph.normalization.steps:
        graph.normalization.steps["l2"] = L2Normalize()
    return graph


def heads(sizes: Sequence[int], cases: dict[str, list[str]], eager_l2: bool) -> None:
    print(
        f"| ResNet-18, random init | {' | '.join(f'{s} px ONNX | {s} px eager' for s in sizes)} |"
    )
    print("|---|" + "---:|" * 2 * len(sizes))
    for name, overrides in cases.items():
        model = random_model(overrides)
        graph = export_graph(model, eager_l2)
        exact = copy.deepcopy(model).double()
        row = []
        for size in sizes:
            x = photographs(size)
            with torch.no_grad():
                reference, eager = exact(x), model(x)
            row += [f"{err(onnx_run(graph, x), reference):.1e}", f"{err(eager, reference):.1e}"]
        print(f"| {name} | {' | '.join(row)} |", flush=True)


def stages(size: int, eager_l2: bool) -> None:
    model = random_model([])
    graph = export_graph(model, eager_l2)
    exact = copy.deepcopy(graph).double()
    x = photographs(size)
    print(f"| stage at {size} px | eager float32 | ONNX Runtime |\n|---|---:|---:|")
    with torch.no_grad():
        fmap = exact.backbone(exact.normalize_input(x))
        scale = float(fmap.abs().max())
        eager = graph.backbone(graph.normalize_input(x))
        onnx = onnx_run(lambda t: graph.backbone(graph.normalize_input(t)), x)
        relative = [err(eager, fmap) / scale, err(onnx, fmap) / scale]
        print(f"| backbone (relative) | {relative[0]:.1e} | {relative[1]:.1e} |")
        inp = fmap
        parts = [("pooling", graph.pooling, exact.pooling)]
        parts += [
            (n, s, exact.normalization.steps[n]) for n, s in graph.normalization.steps.items()
        ]
        parts += [("classifier", graph.classifier, exact.classifier)]
        for name, step, step64 in parts:
            reference = step64(inp)
            errors = [
                err(step(inp.float()), reference),
                err(onnx_run(step, inp.float()), reference),
            ]
            top = float(reference.abs().max())
            print(f"| {name} (values up to {top:.3g}) | {errors[0]:.1e} | {errors[1]:.1e} |")
            inp = reference


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 448])
    parser.add_argument("--stages", action="store_true", help="bisect the default model")
    parser.add_argument("--case", action="append", help="overrides of one extra case")
    parser.add_argument("--eager-l2", action="store_true", help="export ReduceL2 (before)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.stages:
        for size in args.sizes:
            stages(size, args.eager_l2)
        return 0
    cases = {c: c.split() for c in args.case} if args.case else CASES
    heads(args.sizes, cases, args.eager_l2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
