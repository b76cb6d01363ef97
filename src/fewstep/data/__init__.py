"""Data sources, transforms and batching."""

from .sources import build_dataset, collate

__all__ = ["build_dataset", "collate"]
