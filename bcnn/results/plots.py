"""Figures: training curves of one run and ours-vs-published bars of a table.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch), so they work on headless machines and inside training processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Loss and accuracy per epoch, one colour per stage, from a run's ``metrics.csv``.

    The stages are drawn one after the other on a common epoch axis (a dashed line marks
    where fine-tuning starts). Validation curves are left out when the run has no
    validation split (all NaN).

    Args:
        metrics_csv: ``metrics.csv`` with columns ``stage, epoch, train_loss, train_acc,
            val_acc`` (``lr``, ``val_mean_class_acc``, ``seconds`` are not needed).
        out_png: Where to write the figure; its folder is created.

    Returns:
        ``out_png`` as a Path.
    """
    df = pd.read_csv(metrics_csv)
    # A resumed run may log an epoch twice: the last entry is the one that counts.
    df = df.drop_duplicates(["stage", "epoch"], keep="last").reset_index(drop=True)
    df["step"] = np.arange(1, len(df) + 1)
    fig = _figure(10, 3.8)
    ax_loss, ax_acc = fig.subplots(1, 2)
    colors = {}
    for i, (stage, part) in enumerate(df.groupby("stage", sort=False)):
        color = colors.setdefault(stage, f"C{i}")
        ax_loss.plot(part["step"], part["train_loss"], "-o", ms=3, color=color, label=stage)
        ax_acc.plot(
            part["step"], part["train_acc"], "-o", ms=3, color=color, label=f"{stage} train"
        )
        if part["val_acc"].notna().any():
            ax_acc.plot(
                part["step"], part["val_acc"], "--s", ms=3, color=color, label=f"{stage} val"
            )
        if i > 0:
            for ax in (ax_loss, ax_acc):
                ax.axvline(part["step"].iloc[0] - 0.5, color="0.6", ls=":", lw=1)
    ax_loss.set(xlabel="epoch (all stages)", ylabel="training loss", title="Loss")
    ax_acc.set(xlabel="epoch (all stages)", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def plot_comparison(report: pd.DataFrame, out_png: str | Path, title: str = "") -> Path:
    """Horizontal bars of our accuracy next to the published one for every table cell.

    Args:
        report: ``table_report``'s long DataFrame (columns ``cell``, ``ours``,
            ``published``); cells without a value get no bar.
        out_png: Where to write the figure; its folder is created.
        title: Figure title.

    Returns:
        ``out_png`` as a Path.
    """
    n = len(report)
    fig = _figure(8, 1.2 + 0.28 * max(n, 1))
    ax = fig.subplots()
    y = np.arange(n)
    h = 0.4
    ax.barh(y - h / 2, report["published"].astype(float), h, label="published", color="C7")
    ax.barh(y + h / 2, report["ours"].astype(float), h, label="ours", color="C0")
    ax.set_yticks(y, report["cell"], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
