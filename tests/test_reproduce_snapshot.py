"""The tables against a snapshot: ``reproduce.py list``, every row and every published number.

``tests/fixtures/reproduce_tables.json`` was captured from the tables as Python code
(before they became data files) and is updated only on purpose, in the commit that
changes a row (``python -m tests.test_reproduce_snapshot`` rewrites it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bcnn.cli.reproduce import table_list
from bcnn.reproduce.collect import markdown_table, paper_layout, report_frame
from bcnn.reproduce.tables import TABLES, Row, Table

FIXTURE = Path(__file__).parent / "fixtures" / "reproduce_tables.json"


def _row(r: Row) -> dict[str, Any]:
    return {
        "id": r.id,
        "label": r.label,
        "columns": list(r.columns),
        "overrides": list(r.overrides),
        "key": list(r.key) if r.key else None,
        "paper": list(r.paper) if r.paper else None,
        "reason": r.reason,
        "benchmark": list(r.benchmark) if r.benchmark else None,
        "splits": list(r.splits),
        "job_ids": r.job_ids,
    }


def _table(t: Table) -> dict[str, Any]:
    """A table's spec and the report of a sweep that ran nothing (the published numbers)."""
    report = report_frame(t, pd.DataFrame(columns=["job", "status", "overrides"]))
    wide = paper_layout(report, t)
    fmts = {f"{c} {m}": "+.1f" if m == "diff" else ".1f" for c, m in wide.columns}
    return {
        "title": t.title,
        "description": t.description,
        "column_names": list(t.column_names),
        "notes": list(t.notes),
        "reference": t.reference,
        "second": t.second,
        "report": markdown_table(wide, fmts),
        "rows": [_row(r) for r in t.rows],
    }


def snapshot() -> dict[str, Any]:
    """What the fixture holds, from the tables as they are now."""
    return {"list": table_list(), "tables": {n: _table(t) for n, t in TABLES.items()}}


def _dump(data: dict[str, Any]) -> str:
    """JSON with one line per row (readable diffs)."""
    lines = ["{", f' "list": {json.dumps(data["list"])},', ' "tables": {']
    for i, (name, t) in enumerate(data["tables"].items()):
        lines.append(f"  {json.dumps(name)}: {{")
        lines += [f"   {json.dumps(k)}: {json.dumps(v)}," for k, v in t.items() if k != "rows"]
        rows = [f"    {json.dumps(r)}" for r in t["rows"]]
        lines += ['   "rows": [', ",\n".join(rows), "   ]"]
        lines.append("  }" + ("," if i < len(data["tables"]) - 1 else ""))
    return "\n".join([*lines, " }", "}"]) + "\n"


EXPECTED = json.loads(FIXTURE.read_text())


def test_list_prints_the_same_tables() -> None:
    assert table_list() == EXPECTED["list"]
    assert list(TABLES) == list(EXPECTED["tables"])


@pytest.mark.parametrize("name", list(EXPECTED["tables"]))
def test_table_has_the_same_rows_and_numbers(name: str) -> None:
    got, want = _table(TABLES[name]), EXPECTED["tables"][name]
    assert [r["id"] for r in got["rows"]] == [r["id"] for r in want["rows"]]
    for new, old in zip(got["rows"], want["rows"]):
        assert new == old, new["id"]
    assert {k: v for k, v in got.items() if k != "rows"} == {
        k: v for k, v in want.items() if k != "rows"
    }


if __name__ == "__main__":
    FIXTURE.write_text(_dump(snapshot()))
    sys.exit(0)
