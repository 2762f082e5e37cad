"""Training curves of one run (``curves.png``), drawn on an Agg canvas without pyplot (no
global backend switch), so they work on headless machines and inside training processes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def figure(width: float, height: float) -> Figure:
    """A matplotlib Figure of ``width`` x ``height`` inches on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Draws loss and accuracy per epoch from a run's ``metrics.csv`` (columns ``stage,
    epoch, train_loss, train_acc, val_acc``) into ``out_png`` (returned), the stages one
    after the other in their own colours; no validation curve without a validation split.
    """
    df = pd.read_csv(metrics_csv)
    # A resumed run may log an epoch twice: the last entry is the one that counts.
    df = df.drop_duplicates(["stage", "epoch"], keep="last").reset_index(drop=True)
    df["step"] = np.arange(1, len(df) + 1)
    fig = figure(10, 3.8)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, (stage, part) in enumerate(df.groupby("stage", sort=False)):
        x, style = part["step"], {"ms": 3, "color": f"C{i}"}
        ax_loss.plot(x, part["train_loss"], "-o", label=stage, **style)
        ax_acc.plot(x, part["train_acc"], "-o", label=f"{stage} train", **style)
        if part["val_acc"].notna().any():
            ax_acc.plot(x, part["val_acc"], "--s", label=f"{stage} val", **style)
        if i > 0:
            for ax in (ax_loss, ax_acc):
                ax.axvline(x.iloc[0] - 0.5, color="0.6", ls=":", lw=1)
    ax_loss.set(xlabel="epoch (all stages)", ylabel="training loss", title="Loss")
    ax_acc.set(xlabel="epoch (all stages)", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
