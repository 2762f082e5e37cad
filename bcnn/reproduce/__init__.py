"""Reproducing the published tables: specs, launching, collecting and reporting.

* ``tables``: the published tables as rows of Hydra overrides plus paper keys.
* ``launch``: one Hydra multirun per table, exactly one job per row (and smoke mode).
* ``collect``: gather any sweep into a DataFrame, summaries, paper-style reports.
* ``plots``: ours-vs-published bar charts.
* ``protocols``: the protocol table of the presets (``docs/protocols.md``) and its checks.
* ``optim``: per-group optimizer settings for presets that follow the authors' code.
"""

from bcnn.reproduce.collect import collect_runs, summarize_sweep, table_report
from bcnn.reproduce.plots import plot_comparison
from bcnn.reproduce.tables import TABLES, PaperKey, Row, Table, get_table, published

__all__ = [
    "TABLES",
    "PaperKey",
    "Row",
    "Table",
    "collect_runs",
    "get_table",
    "plot_comparison",
    "published",
    "summarize_sweep",
    "table_report",
]
