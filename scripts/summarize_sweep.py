"""Summarize any train.py multirun: ``python scripts/summarize_sweep.py <sweep_dir> [out_dir]``.

Writes ``summary.csv`` (every override and metric of every job) and ``summary.md`` (the
main columns) into ``out_dir`` (default: the sweep directory) and prints the Markdown.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bcnn.reproduce.collect import summarize_sweep


def main(argv: list[str]) -> int:
    """Runs the command line; returns the exit status."""
    if len(argv) not in (1, 2) or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    sweep = Path(argv[0])
    if not sweep.is_dir():
        print(f"no such directory: {sweep}", file=sys.stderr)
        return 2
    out = Path(argv[1]) if len(argv) == 2 else sweep
    df = summarize_sweep(sweep, out)
    print((out / "summary.md").read_text())
    return 0 if len(df) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
