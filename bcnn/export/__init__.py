"""Exporting trained models (safetensors, TorchScript, ONNX) and running them again.

* ``bcnn.export.graph``: an exportable copy of a model (matrix functions as products).
* ``bcnn.export.writer``: ``export_trained`` writes the model, its metadata and model card.
* ``bcnn.export.runtime``: ``load_predictor`` scores images with a run, a checkpoint or an
  exported model.

See docs/deploy.md.
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
