"""The console scripts, the top layer: ``bcnn-eval`` (``evaluate``), ``bcnn-viz`` (``viz``),
``bcnn-prepare-data`` (``prepare_data``), ``bcnn-reproduce`` and ``bcnn-summarize-sweep``
(``reproduce``) beside ``bcnn-train`` (``bcnn/train.py``) are Hydra applications that run
``overrides.check_overrides`` first; ``bcnn-predict`` and ``bcnn-export`` take file paths
(argparse). ``callbacks`` holds train's Hydra callbacks, ``errors`` the one-message
handling of user errors.
"""
