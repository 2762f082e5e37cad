"""What second-order models learn: texture synthesis, maximal images, contribution maps and
an HTML report of a training run (``bcnn-viz``, docs/visualize.md)."""

from bcnn.viz.app import visualize
from bcnn.viz.contributions import (
    class_contributions,
    democratic_contributions,
    matrix_contributions,
    sum_contributions,
)
from bcnn.viz.inverse import maximal_images
from bcnn.viz.layers import FeatureTaps
from bcnn.viz.report import build_report
from bcnn.viz.texture import synthesize_texture

__all__ = [
    "FeatureTaps",
    "build_report",
    "class_contributions",
    "democratic_contributions",
    "matrix_contributions",
    "maximal_images",
    "sum_contributions",
    "synthesize_texture",
    "visualize",
]
