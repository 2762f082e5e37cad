"""``bcnn-summarize-sweep`` from a checkout: ``python scripts/summarize_sweep.py <sweep_dir>
[out_dir]`` writes summary.csv and summary.md of every job and prints the Markdown."""

import sys

from bcnn.cli.reproduce import summarize_main as main

if __name__ == "__main__":
    sys.exit(main())
