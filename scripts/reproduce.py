"""``bcnn-reproduce`` from a checkout: train and report a published table."""

import sys

from bcnn.cli.reproduce import main, parse_args  # noqa: F401  (tests import them from here)

if __name__ == "__main__":
    sys.exit(main())
