"""MNIST helpers: reading the IDX files, digit captions, the fixed train / held-out split, folders.

fewstep uses the 10,000-image MNIST *test* set (``t10k-*``) as its toy text-to-image corpus. The split
used everywhere (the bundled teacher, ``assets/mnist_subset.npz``, the shipped digit classifier):
images 0..8999 are for training, 9000..9999 are held out for evaluation (label counts 85..119 per digit).

    python -m fewstep.eval.mnist --mnist ../shared/data/mnist --out data/mnist_train --split train
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
N_EVAL = 1000
SPLITS = ("train", "eval")
# The digits shipped with fewstep: 3,000 of the training split and the 1,000 held-out ones (28 px, uint8).
SUBSET = Path(__file__).resolve().parents[1] / "assets" / "mnist_subset.npz"


def heldout_digits():
    """The 1,000 bundled held-out digits as images in [0, 1], shape (1000, 3, 32, 32): the reference of
    ``fewstep eval --reference mnist-heldout`` and of the demo."""
    import torch

    data = np.load(SUBSET)
    x = torch.from_numpy(pad32(data["eval_images"])).float() / 255
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def caption_for(label: int) -> str:
    """``7 → "a handwritten digit seven"``: the prompt the teacher was trained with."""
    label = int(label)
    if not 0 <= label <= 9:
        raise ValueError(f"not a digit label: {label}")
    return f"a handwritten digit {DIGIT_WORDS[label]}"


def label_from_prompt(prompt: str) -> int | None:
    """The digit a prompt asks for (the last digit word in it), or None when it names none."""
    hits = [DIGIT_WORDS.index(w) for w in re.findall(r"[a-z]+", prompt.lower()) if w in DIGIT_WORDS]
    return hits[-1] if hits else None


def read_mnist(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) from the gzipped IDX files in ``root``."""
    root = Path(root)
    missing = [name for name in (IMAGES, LABELS) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"MNIST files missing in {root}: {', '.join(missing)} "
                                f"(expected {IMAGES} and {LABELS}, the gzipped IDX test set)")
    with gzip.open(root / IMAGES, "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / LABELS, "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels


def split_indices(n: int = 10000, n_eval: int = N_EVAL, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) index arrays, disjoint, sorted, covering ``range(n)``; always the same for the same arguments.

    ``seed=None`` (the default, and the split everything shipped was made with): the last ``n_eval`` images
    are held out. An integer seed instead holds out a seeded random sample of ``n_eval`` images.
    """
    if not 0 < n_eval < n:
        raise ValueError(f"n_eval must be in (0, {n}), got {n_eval}")
    if seed is None:
        return np.arange(n - n_eval), np.arange(n - n_eval, n)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def pad32(images: np.ndarray) -> np.ndarray:
    """28×28 → 32×32 with a 2-pixel black border on every side (the digits keep their size)."""
    images = np.asarray(images)
    return np.pad(images, [(0, 0)] * (images.ndim - 2) + [(2, 2), (2, 2)])


def _split(images: np.ndarray, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split_indices(len(images))[SPLITS.index(split)]


def write_mnist_folder(root, out_dir, split: str = "train", limit: int | None = None) -> Path:
    """One split as the trainer's image-folder format: ``00000.png`` (32×32, grey as RGB) with a
    ``00000.txt`` caption next to it, plus ``labels.json`` (the digit of every file, in order)."""
    from PIL import Image

    images, labels = read_mnist(root)
    idx = _split(images, split)
    if limit is not None:
        idx = idx[:limit]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    padded = pad32(images[idx])
    for j in range(len(idx)):
        rgb = np.repeat(padded[j][:, :, None], 3, axis=2)
        Image.fromarray(rgb).save(out / f"{j:05d}.png")
        (out / f"{j:05d}.txt").write_text(caption_for(labels[idx[j]]))
    (out / "labels.json").write_text(json.dumps([int(v) for v in labels[idx]]) + "\n")
    return out


def to_tensor(images: np.ndarray, channels: int = 1):
    """uint8 [N, 28 or 32, 28 or 32] → float [N, channels, 32, 32] in [0, 1] (28 px digits are padded)."""
    import torch

    if images.shape[-1] == 28:
        images = pad32(images)
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255)[:, None]
    return x.expand(-1, channels, -1, -1).contiguous() if channels != 1 else x


def load_eval_arrays(root, channels: int = 1):
    """The 1,000 held-out digits as (float [1000, channels, 32, 32] in [0, 1], labels int64 [1000])."""
    import torch

    images, labels = read_mnist(root)
    idx = _split(images, "eval")
    return to_tensor(images[idx], channels), torch.from_numpy(labels[idx].astype(np.int64))


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write an MNIST split as a PNG + caption folder for fewstep.")
    p.add_argument("--mnist", required=True, help=f"folder with {IMAGES} and {LABELS}")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--limit", type=int, default=None)
    a = p.parse_args(argv)
    print(write_mnist_folder(a.mnist, a.out, a.split, a.limit))


if __name__ == "__main__":
    main()
