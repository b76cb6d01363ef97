"""A small MNIST classifier, trained by the project and shipped: the offline feature extractor for
Fréchet distances on digits (its penultimate layer) and the judge of prompt fidelity.

    python -m fewstep.eval.digits --mnist ../shared/data/mnist
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
    """Three conv-pool stages (32 → 16 → 8 → 4 px) → 128-d features → 10 logits; inputs 32×32 in [0, 1]."""

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
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return F.relu(self.fc(self.drop(self.conv(x).flatten(1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digit_classifier(path: str | Path | None = None) -> DigitNet:
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
    from safetensors.torch import save_file

    from .mnist import load_eval_arrays, read_mnist, split_indices, to_tensor

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = read_mnist(root)
    tr = split_indices(len(images))[0]
    x, y = to_tensor(images[tr])[:, :1], torch.from_numpy(labels[tr].astype("int64"))
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
        acc = (net(xe).argmax(1) == ye).float().mean().item()
    info = {"eval_accuracy": acc, "eval_images": len(xe), "train_images": len(x), "epochs": epochs, "seed": seed,
            "train_seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d")}
    out = Path(out_path)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(out))
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Train the digit classifier used by fewstep eval.")
    p.add_argument("--mnist", required=True)
    p.add_argument("--out", default=str(ASSET))
    p.add_argument("--epochs", type=int, default=12)
    a = p.parse_args()
    torch.set_num_threads(2)
    print(train_digit_classifier(a.mnist, a.out, a.epochs))
