"""Reproducing the published tables: ``tables`` (the rows, read from ``bcnn/resources``),
``launch`` (one Hydra multirun per table), ``collect`` (sweeps into DataFrames, reports and
plots), ``protocols`` (every preset's protocol and its sources), ``optim`` (per-group
optimizer settings) and ``sketch`` (gamma-democratic aggregation in Tensor Sketch space).
Import the submodules: this package imports nothing by itself.
"""
