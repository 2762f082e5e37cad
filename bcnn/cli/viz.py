"""``bcnn-viz`` (= ``python -m bcnn.cli.viz``): what a model learned, as pictures; a Hydra
application (``configs/viz.yaml``, docs/visualize.md) around ``bcnn.viz.app.visualize``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bcnn.cli.overrides import check_overrides
from bcnn.errors import user_errors
from bcnn.viz.app import visualize

PROG = "bcnn-viz"


@hydra.main(version_base="1.3", config_path="pkg://bcnn.configs", config_name="viz")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors(PROG):
        visualize(cfg)


def main() -> None:
    """``bcnn-viz kind=<texture|inverse|maps|report> run=<training run dir> ...``."""
    check_overrides(PROG, "viz")
    _hydra_main()


if __name__ == "__main__":
    main()
