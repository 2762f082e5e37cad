"""A self-contained HTML page about one training run (``bcnn-viz kind=report``).

Sections: the run (model and dataset config), its accuracies (``results.json``), its
training curves (``metrics.csv``), the confusion matrix and per-class accuracy of the
model on a split, and the most confused pairs of classes with example images and their
class-specific contribution maps (``bcnn.viz.contributions.class_contributions``) for the
predicted and the true class. Every picture is inlined as a base64 PNG and the style
sheet is in the page: the file references nothing else and opens anywhere.
"""

from __future__ import annotations

import html
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from bcnn.engine.curves import plot_training_curves
from bcnn.engine.runs import TrainedModel
from bcnn.viz.contributions import class_contributions
from bcnn.viz.figures import draw_image, draw_overlay, figure, labelled_grid, png_data_uri

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
img { max-width: 100%; height: auto; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
.note { color: #555; font-size: 0.9em; }
"""


@dataclass
class Predictions:
    """A model's softmax ``probs`` (N, K) on the images ``indices`` (N,) of a split, whose
    true classes are ``labels`` (N,)."""

    indices: np.ndarray
    labels: np.ndarray
    probs: np.ndarray

    @property
    def preds(self) -> np.ndarray:
        """(N,) the predicted classes."""
        return self.probs.argmax(1)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    max_images: int | None = None,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> Predictions:
    """Softmax of ``model`` on the first ``max_images`` images of ``dataset`` (all: None);
    a progress bar labelled ``desc`` unless it is None."""
    n = len(dataset)  # type: ignore[arg-type]
    count = n if max_images is None else min(n, int(max_images))
    loader = DataLoader(Subset(dataset, range(count)), batch_size=batch_size, shuffle=False)
    model.eval()
    labels, probs = [], []
    for images, target in tqdm(loader, desc=desc, disable=desc is None, leave=False):
        probs.append(model(images.to(device)).float().softmax(1).cpu())
        labels.append(torch.as_tensor(target))
    return Predictions(
        np.arange(count), torch.cat(labels).numpy(), torch.cat(probs).numpy().astype(np.float64)
    )


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def confused_pairs(matrix: np.ndarray, top: int) -> list[tuple[int, int, int]]:
    """The ``top`` largest off-diagonal counts as (true, predicted, count), count > 0."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    pairs = [(int(i // off.shape[1]), int(i % off.shape[1])) for i in order]
    return [(a, b, int(off[a, b])) for a, b in pairs if off[a, b] > 0]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], name_columns: int = 1) -> str:
    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="name"' if i < name_columns else ""
        if isinstance(value, float):
            value = "" if math.isnan(value) else f"{value:.2f}"
        return f"<{tag}{cls}>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _results_section(run_dir: Path) -> str:
    path = run_dir / "results.json"
    if not path.is_file():
        return '<p class="note">No results.json in the run directory (an unfinished run?).</p>'
    results = json.loads(path.read_text())
    keys = ("test_acc", "test_mean_class_acc", "val_acc", "val_mean_class_acc")
    rows = [["final", *(float(results.get(k, math.nan)) for k in keys)]]
    for stage, values in (results.get("stages") or {}).items():
        rows.append([stage, *(float(values.get(k, math.nan)) for k in keys)])
    header = ["", "test acc (%)", "test mean class (%)", "val acc (%)", "val mean class (%)"]
    return _table(header, rows)


def _curves_section(run_dir: Path) -> str:
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return '<p class="note">No metrics.csv in the run directory.</p>'
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_training_curves(metrics, Path(tmp) / "curves.png")
        return _img(png_data_uri(png), "training curves")


def confusion_figure(matrix: np.ndarray, classes: Sequence[str]) -> Figure:
    """The ``(K, K)`` counts (row = true class) normalized per row, with the class names as
    ticks up to 40 classes and the counts in the cells up to 16 (also ``bcnn-eval``'s)."""
    k = len(classes)
    side = min(11.0, 2.5 + 0.32 * k)
    fig = figure(side, side * 0.85)
    ax = fig.subplots()
    rows = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    if k <= 40:
        ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(k), classes, fontsize=7)
        if k <= 16:
            for (i, j), v in np.ndenumerate(matrix):
                if v:
                    colour = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=colour)
    ax.set(xlabel="predicted", ylabel="true")
    return fig


def _pair_figure(
    trained: TrainedModel,
    images: torch.Tensor,
    true_class: int,
    predicted: int,
    device: torch.device | str,
    opacity: float,
):
    """Rows: examples; columns: image, S_predicted(x), S_true(x)."""
    model = trained.model
    images = images.to(device)
    b = images.shape[0]
    pred_maps = class_contributions(model, images, torch.full((b,), predicted))
    true_maps = class_contributions(model, images, torch.full((b,), true_class))
    probs = pred_maps.logits.float().softmax(1)
    fig = figure(6.0, 2.2 * b)
    axes = np.asarray(fig.subplots(b, 3)).reshape(b, 3)
    names = trained.classes
    for i in range(b):
        draw_image(
            axes[i, 0],
            images[i].cpu(),
            f"P({names[predicted]}) {probs[i, predicted]:.2f}\n"
            f"P({names[true_class]}) {probs[i, true_class]:.2f}",
        )
        for ax, maps, name in (
            (axes[i, 1], pred_maps, names[predicted]),
            (axes[i, 2], true_maps, names[true_class]),
        ):
            draw_overlay(
                ax,
                images[i].cpu(),
                maps.values[i].cpu(),
                maps.grid,
                title=f"S_{name}",
                signed=True,
                opacity=opacity,
            )
    return fig


def _run_section(trained: TrainedModel) -> list[str]:
    """The page's head, title and config, and the run's accuracies and training curves."""
    run_dir, cfg = trained.run_dir, trained.config
    model_yaml = OmegaConf.to_yaml(
        {k: cfg[k] for k in ("backbone", "pooling", "normalization", "classifier", "dataset")}
    )
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>bcnn report: {html.escape(run_dir.name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Training run {html.escape(str(run_dir))}</h1>",
        f'<p class="note">Checkpoint {html.escape(str(trained.checkpoint))}; '
        f"{len(trained.classes)} classes.</p>",
        "<details><summary>Model and dataset config</summary>",
        f"<pre>{html.escape(model_yaml)}</pre></details>",
        "<h2>Accuracy</h2>",
        _results_section(run_dir),
        "<h2>Training curves</h2>",
        _curves_section(run_dir),
    ]


def _confusion_section(matrix: np.ndarray, classes: Sequence[str], split: str) -> list[str]:
    """The confusion matrix of the split and its per-class accuracies (worst first)."""
    accuracy = 100.0 * float(np.trace(matrix)) / max(1, int(matrix.sum()))
    per_class = np.divide(
        np.diag(matrix), matrix.sum(1), out=np.full(len(classes), np.nan), where=matrix.sum(1) > 0
    )
    order = np.argsort(np.nan_to_num(per_class, nan=np.inf), kind="stable")
    shown = order if len(classes) <= 50 else order[:25]
    class_rows = [[classes[c], int(matrix[c].sum()), 100.0 * float(per_class[c])] for c in shown]
    return [
        f"<h2>Confusion matrix ({html.escape(split)})</h2>",
        f'<p class="note">{int(matrix.sum())} images of the {html.escape(split)} split; '
        f"accuracy {accuracy:.2f}% (without test-time flipping).</p>",
        _img(png_data_uri(confusion_figure(matrix, classes)), "confusion matrix"),
        "<h3>Per-class accuracy" + (" (worst 25)" if len(shown) < len(classes) else "") + "</h3>",
        _table(["class", "images", "accuracy (%)"], class_rows),
    ]


def _pairs_table(
    confused: list[tuple[int, int, int]], classes: Sequence[str], maps_supported: bool
) -> list[str]:
    """The note and table of the most confused pairs (or that there are none)."""
    if not confused:
        return ['<p class="note">No image of the split is misclassified.</p>']
    note = '<p class="note">Per pair: images of the true class predicted as the other' + (
        ", with the class-specific contribution maps S<sub>c</sub>(x) of the "
        "predicted and the true class (each location's share of the class score; "
        "red raises it, blue lowers it; see docs/visualize.md).</p>"
        if maps_supported
        else " (this model's head has no contribution maps).</p>"
    )
    table = _table(
        ["true", "predicted as", "images"],
        [[classes[a], classes[b], n] for a, b, n in confused],
        name_columns=2,
    )
    return [note, table]


def _pair_section(
    trained: TrainedModel,
    dataset: Dataset,
    preds: Predictions,
    pair: tuple[int, int, int],
    examples: int,
    device: torch.device | str,
    opacity: float,
    maps_supported: bool,
) -> list[str]:
    """One confused pair (true a, predicted b, n images): its first example images, with
    their contribution maps when ``maps_supported``.

    Args:
        trained: The run.
        dataset: The split.
        preds: The model's predictions on it.
        pair: ``(a, b, n)``.
        examples: How many images to show.
        device: Where the model runs.
        opacity: Of the contribution maps.
        maps_supported: Draw contribution maps.
    """
    classes = trained.classes
    a, b, n = pair
    chosen = np.flatnonzero((preds.labels == a) & (preds.preds == b))[:examples]
    heading = f"<h3>{html.escape(classes[a])} &rarr; {html.escape(classes[b])} ({n} images)</h3>"
    images = torch.stack([dataset[int(preds.indices[i])][0] for i in chosen])
    if maps_supported:
        fig = _pair_figure(trained, images, a, b, device, opacity)
    else:
        captions = [f"P({classes[b]}) {preds.probs[i, b]:.2f}" for i in chosen]
        fig = labelled_grid(images, captions, columns=examples)
    return [heading, _img(png_data_uri(fig), f"{classes[a]} predicted as {classes[b]}")]


def build_report(
    trained: TrainedModel,
    dataset: Dataset,
    path: str | Path,
    *,
    split: str = "test",
    pairs: int = 5,
    examples: int = 4,
    batch_size: int = 64,
    max_images: int | None = None,
    device: torch.device | str = "cpu",
    opacity: float = 0.55,
    maps_supported: bool = True,
    progress: bool = False,
) -> Path:
    """Writes the HTML report of a trained run.

    Args:
        trained: The run (``bcnn.engine.runs.load_trained``).
        dataset: The split to evaluate (items ``(image, label)``).
        path: The HTML file to write.
        split: The split's name (for the page).
        pairs: How many confused pairs to show.
        examples: Example images per pair.
        batch_size: Evaluation batch size.
        max_images: Evaluate only the first images of the split (None: all).
        device: Where the model runs.
        opacity: Of the contribution maps.
        maps_supported: Draw contribution maps (False for heads they do not cover).
        progress: Show a progress bar while the split is evaluated.

    Returns:
        ``path``.
    """
    preds = predict(
        trained.model,
        dataset,
        batch_size=batch_size,
        max_images=max_images,
        device=device,
        desc=f"report: {split}" if progress else None,
    )
    matrix = confusion_matrix(preds.labels, preds.preds, len(trained.classes))
    parts = [
        *_run_section(trained),
        *_confusion_section(matrix, trained.classes, split),
        "<h2>Most confused pairs</h2>",
    ]
    confused = confused_pairs(matrix, pairs)
    parts += _pairs_table(confused, trained.classes, maps_supported)
    for pair in confused:
        parts += _pair_section(
            trained, dataset, preds, pair, examples, device, opacity, maps_supported
        )
    parts.append("</body></html>")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
