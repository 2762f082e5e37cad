"""Ours-vs-published bar charts of a reproduced table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bcnn.engine.curves import figure


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
    fig = figure(8, 1.2 + 0.28 * max(n, 1))
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
