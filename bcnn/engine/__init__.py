"""The training engine; ``train`` is imported on first use, so that importing a small part
(``bcnn.engine.loops``) does not pull in the whole trainer."""

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from bcnn.engine.trainer import train

        return train
    raise AttributeError(f"module 'bcnn.engine' has no attribute {name!r}")
