"""Exporting trained models (safetensors, TorchScript, ONNX) and running them again.

``graph``: an exportable copy of a model; ``writer``: ``export_trained`` writes the model,
its metadata and card, checked by ``parity``; ``runtime``: ``load_predictor`` scores
images with a run, a checkpoint or an exported model. See docs/deploy.md.
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
