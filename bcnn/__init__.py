"""bcnn: bilinear CNNs and second-order pooling for fine-grained recognition."""

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _register_source_configs() -> None:
    # Installed (wheel or editable), the top-level configs/ folder is the subpackage
    # bcnn.configs. Run from a source checkout's root, Python imports this package from
    # the working tree instead, where configs/ sits beside it: map it the same way.
    if "bcnn.configs" in sys.modules or (Path(__file__).parent / "configs").is_dir():
        return
    init = Path(__file__).resolve().parent.parent / "configs" / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "bcnn.configs", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["bcnn.configs"] = module
        spec.loader.exec_module(module)
        globals()["configs"] = module


_register_source_configs()
