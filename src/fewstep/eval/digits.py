"""A small MNIST classifier, trained by the project and shipped: the offline feature extractor for
Fréchet distances on digits (its penultimate layer) and the judge of prompt fidelity.

Trained on the 9,000 training digits of :mod:`fewstep.eval.mnist`'s split, scored on the 1,000 held-out
ones; about a minute on 2 CPU cores, deterministic for a given seed (it reproduces the shipped weights):

    python -m fewstep.eval.digits --mnist ../shared/data/mnist --out src/fewstep/assets/digit_classifier.safetensors
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ASSET = Path(__file__).resolve().parents[1] / "assets" / "digit_classifier.safetensors"


class DigitNet(nn.Module):
    """Three conv-pool stages (32 → 16 → 8 → 4 px) → 128-d features → 10 logits.

    Inputs are images in [0, 1], [N, 1, H, W] or RGB [N, 3, H, W] (channels are averaged); other sizes
    than 32×32 are resized bilinearly.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(64 * 16, 128)
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if tuple(x.shape[-2:]) != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return F.relu(self.fc(self.drop(self.conv(x).flatten(1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digit_classifier(path: str | Path | None = None) -> DigitNet:
    """The classifier in eval mode, fp32 on the CPU; by default the one shipped in ``fewstep/assets``."""
    from safetensors.torch import load_file

    p = Path(path) if path else ASSET
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no digit classifier; train one with python -m fewstep.eval.digits")
    net = DigitNet()
    net.load_state_dict({k: v.float() for k, v in load_file(str(p)).items()})
    return net.eval()


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translations of up to ±2 px (the digits are padded, so nothing is cut off)."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def train_digit_classifier(root, out_path=ASSET, epochs: int = 12, seed: int = 0) -> dict:
    """Train on the training split of the MNIST files in ``root``, score on the held-out split, and save
    fp16 safetensors at ``out_path`` with a ``.json`` sidecar (the returned dict: accuracy, epochs, ...)."""
    from safetensors.torch import save_file

    from .mnist import load_eval_arrays, read_mnist, split_indices, to_tensor

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = read_mnist(root)
    tr = split_indices(len(images))[0]
    x, y = to_tensor(images[tr]), torch.from_numpy(labels[tr].astype("int64"))
    xe, ye = load_eval_arrays(root)
    net = DigitNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    t0 = time.time()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 127, 128):
            b = perm[i:i + 128]
            loss = F.cross_entropy(net(_shift(x[b], g)), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        correct = int((net(xe).argmax(1) == ye).sum())
    info = {"accuracy": correct / len(xe), "eval_images": len(xe), "train_images": len(x), "epochs": epochs,
            "seed": seed, "train_seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(out))
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> dict:
    import argparse

    p = argparse.ArgumentParser(description="Train the digit classifier used by fewstep eval.")
    p.add_argument("--mnist", required=True, help="folder with the MNIST IDX .gz files")
    p.add_argument("--out", default=str(ASSET))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    info = train_digit_classifier(a.mnist, a.out, a.epochs, a.seed)
    print(f"eval accuracy {100 * info['accuracy']:.2f}% on {info['eval_images']} held-out digits; "
          f"trained in {info['train_seconds']} s; wrote {a.out}")
    return info


if __name__ == "__main__":
    main()
