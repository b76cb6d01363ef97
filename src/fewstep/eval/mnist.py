"""MNIST helpers: reading the IDX files, captions, the fixed train / held-out split.

The split used everywhere in fewstep: images 0..8999 of the MNIST test set train (the bundled teacher
saw only them), 9000..9999 are held out for evaluation.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
N_EVAL = 1000


def caption_for(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def label_from_prompt(prompt: str) -> int | None:
    words = prompt.lower().replace(",", " ").split()
    hits = [DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS]
    return hits[-1] if hits else None


def read_mnist(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) from the gzipped IDX files in ``root``."""
    root = Path(root)
    for name in (IMAGES, LABELS):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} not found: expected the MNIST files {IMAGES} and {LABELS}")
    images = np.frombuffer(gzip.open(root / IMAGES).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(root / LABELS).read(), np.uint8, offset=8)
    return images, labels


def split_indices(n: int = 10000, n_eval: int = N_EVAL) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices: the last ``n_eval`` images are held out."""
    return np.arange(n - n_eval), np.arange(n - n_eval, n)


def pad32(images: np.ndarray) -> np.ndarray:
    """28×28 → 32×32 with a 2-pixel black border (the digits keep their size)."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))


def write_mnist_folder(root, out_dir, split: str = "train", limit: int | None = None) -> Path:
    """32×32 PNGs with .txt captions (the trainer's image-folder format) for one split."""
    from PIL import Image

    images, labels = read_mnist(root)
    idx = split_indices(len(images))[0 if split == "train" else 1]
    if limit is not None:
        idx = idx[:limit]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    padded = pad32(images[idx])
    for j, i in enumerate(idx):
        Image.fromarray(padded[j]).save(out / f"{j:05d}.png")
        (out / f"{j:05d}.txt").write_text(caption_for(labels[i]))
    return out


def to_tensor(images: np.ndarray):
    """uint8 [N, 28|32, ...] → float [N, 3, 32, 32] in [0, 1]."""
    import torch

    if images.shape[-1] == 28:
        images = pad32(images)
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def load_eval_arrays(root):
    """The held-out digits as (float [1000, 3, 32, 32] in [0, 1], labels int64)."""
    import torch

    images, labels = read_mnist(root)
    idx = split_indices(len(images))[1]
    return to_tensor(images[idx]), torch.from_numpy(labels[idx].astype(np.int64))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Write an MNIST split as a caption folder for fewstep.")
    p.add_argument("--mnist", required=True, help="folder with the MNIST IDX .gz files")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=["train", "eval"])
    a = p.parse_args()
    print(write_mnist_folder(a.mnist, a.out, a.split))
