"""Exporting trained models (safetensors, TorchScript, ONNX) and running them again: ``graph``
(an exportable copy), ``writer``, ``parity`` (the check), ``runtime`` (docs/deploy.md).
"""

from bcnn.export.graph import exact_iterations, exportable
from bcnn.export.runtime import METADATA, Predictor, load_predictor, read_metadata
from bcnn.export.writer import FORMATS, ExportResult, export_trained

__all__ = [
    "FORMATS",
    "METADATA",
    "ExportResult",
    "Predictor",
    "exact_iterations",
    "export_trained",
    "exportable",
    "load_predictor",
    "read_metadata",
]
