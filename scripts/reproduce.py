"""``bcnn-reproduce`` from a checkout: train and report a published table."""

from bcnn.cli.reproduce import main

if __name__ == "__main__":
    main()
