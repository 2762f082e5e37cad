"""Reproducing the published tables (docs/reproduce.md). Import the submodules: this package
imports nothing by itself."""
