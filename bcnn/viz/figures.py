"""Pictures: images, heat maps over images, labelled grids, curves (matplotlib, Agg).

Figures are drawn with ``bcnn.engine.curves.figure`` (an Agg canvas per figure, no pyplot
state), so they work headless and inside any process.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bcnn.engine.curves import figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def to_numpy_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) uint8 or floats in [0, 1] -> (H, W, 3) uint8."""
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.permute(1, 2, 0).cpu().numpy()


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Writes a (3, H, W) image (uint8 or [0, 1] floats) as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_numpy_image(image)).save(path)
    return path


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as a uint8 tensor (3, H, W), RGB.

    Raises:
        FileNotFoundError: naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"viz.texture.image: no such image file: {path}")
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def draw_image(ax: Axes, image: torch.Tensor, title: str | None = None) -> None:
    """Shows an image without axes, pixels as squares (small images stay sharp)."""
    ax.imshow(to_numpy_image(image), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=7)


def draw_overlay(
    ax: Axes,
    image: torch.Tensor,
    values: torch.Tensor,
    grid: tuple[int, int],
    *,
    title: str | None = None,
    signed: bool = False,
    opacity: float = 0.55,
) -> None:
    """A per-location map over a grey version of the image, upsampled bilinearly (cells
    centred on the image's).

    Args:
        ax: Where to draw.
        image: (3, H, W).
        values: (n,) with n = h w.
        grid: (h, w).
        title: Axes title.
        signed: Diverging colours symmetric around 0 (blue < 0 < red); else 0 .. max.
        opacity: Of the map over the image.
    """
    grey = to_numpy_image(image).astype(np.float32).mean(-1) / 255.0
    heat = F.interpolate(
        values.detach().float().reshape(1, 1, *grid).cpu(), size=grey.shape, mode="bilinear"
    )[0, 0].numpy()
    draw_image(ax, torch.from_numpy(grey).expand(3, -1, -1), title)
    lim = float(np.abs(heat).max()) or 1.0
    cmap, low = ("RdBu_r", -lim) if signed else ("inferno", 0.0)
    ax.imshow(heat, cmap=cmap, vmin=low, vmax=lim, alpha=opacity)


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Writes a figure as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def png_data_uri(source: Figure | str | Path, dpi: int = 100) -> str:
    """A ``data:image/png;base64,...`` URI of a figure or a PNG file (for inline HTML)."""
    if isinstance(source, (str, Path)):
        data = Path(source).read_bytes()
    else:
        buf = io.BytesIO()
        source.savefig(buf, format="png", dpi=dpi)
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def labelled_grid(
    images: torch.Tensor, labels: Sequence[str], columns: int = 6, tile: float = 1.6
) -> Figure:
    """Images (K, 3, H, W) in a grid, each titled with its label."""
    k = images.shape[0]
    columns = max(1, min(columns, k))
    rows = (k + columns - 1) // columns
    fig = figure(tile * columns, (tile + 0.35) * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image, label in zip(axes, images, labels):
        draw_image(ax, image, label)
    return fig


def loss_curve(
    losses: Sequence[float], scale_starts: Sequence[int] = (0,), ylabel: str = "Gram loss"
) -> Figure:
    """A loss per iteration on a log axis; dotted lines where a new scale starts."""
    fig = figure(5, 3.2)
    ax = fig.subplots()
    ax.plot(np.arange(len(losses)), losses, "-", lw=1.2)
    if all(v > 0 for v in losses):
        ax.set_yscale("log")
    for start in list(scale_starts)[1:]:
        ax.axvline(start, color="0.6", ls=":", lw=1)
    ax.set(xlabel="iteration", ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig
