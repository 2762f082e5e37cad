"""``python -m bcnn.viz kind=... run=...`` (the same as ``bcnn-viz``)."""

from bcnn.viz.app import main

if __name__ == "__main__":
    main()
