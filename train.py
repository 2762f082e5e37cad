"""Train a model: ``python train.py key=value ...`` (see configs/train.yaml)."""

from bcnn.train import main

if __name__ == "__main__":
    main()
