"""LPIPS, the learned perceptual image distance (Zhang et al. 2018, "The Unreasonable Effectiveness of
Deep Features as a Perceptual Metric", version 0.1, VGG16 backbone), from local weights only.

fewstep downloads nothing at run time, and neither torchvision nor the ``lpips`` package is needed: the
backbone is rebuilt from the weights file itself. The file is the ``state_dict()`` of
``lpips.LPIPS(net="vgg")``, written where that package and its weights are available, e.g.

    import lpips, torch
    torch.save(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.pth")   # or safetensors.torch.save_file

It holds the input scaling (``scaling_layer.shift`` / ``.scale``), the VGG16 convolutions split at the
five layers LPIPS reads (``net.slice{k}.{i}.weight``, ``i`` the index in torchvision's ``vgg16().features``)
and the per-layer channel weights (``lin{k}.model.1.weight``). The layer sequence follows from the
indices: a convolution where the file has one (3×3, padding 1), a ReLU right after each convolution, a
2×2 max-pool at every other index; slice k ends at the ReLU of its last convolution.

For images x, y in [-1, 1]: with f_k the backbone's features at layer k of the scaled input, each
normalised to unit length over channels, d(x, y) = Σ_k mean_{h,w} Σ_c w_{k,c} (f̂_k(x) − f̂_k(y))².
(DMD2's regression stage uses the ``piq`` implementation with average pooling and ImageNet
normalisation instead; the linear weights are the same v0.1 ones.)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError

_CONV = re.compile(r"^net\.slice(\d+)\.(\d+)\.weight$")
_LIN = re.compile(r"^lin(\d+)\.model\.1\.weight$")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a local LPIPS weights file (.safetensors, or a torch.save'd .pth/.pt/.bin)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--lpips_weights {path}: no such file (the state_dict of lpips.LPIPS(net='vgg'), "
                          "saved with torch.save or safetensors)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"--lpips_weights {path} cannot be read as a state dict ({type(e).__name__}: {first})") \
            from None
    if not isinstance(sd, dict):
        raise ConfigError(f"--lpips_weights {path} holds a {type(sd).__name__}, not a state dict")
    return sd


class LPIPS(nn.Module):
    """d(x, y) per sample for images in [-1, 1]; frozen, in eval mode (no dropout)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], where: str = "--lpips_weights"):
        super().__init__()
        convs: dict[int, dict[int, str]] = {}
        lins: dict[int, str] = {}
        for k in state_dict:
            if m := _CONV.match(k):
                convs.setdefault(int(m[1]), {})[int(m[2])] = k[: -len(".weight")]
            elif m := _LIN.match(k):
                lins[int(m[1])] = k
        slices = sorted(convs)
        if (not slices or slices != list(range(1, len(slices) + 1)) or sorted(lins) != list(range(len(slices)))
                or "scaling_layer.shift" not in state_dict):
            raise ConfigError(f"{where}: not the state dict of lpips.LPIPS(net='vgg') (expected scaling_layer.*, "
                              "net.slice1..N.<index>.weight and lin0..N-1.model.1.weight)")
        self.register_buffer("shift", state_dict["scaling_layer.shift"].float().reshape(1, -1, 1, 1))
        self.register_buffer("scale", state_dict["scaling_layer.scale"].float().reshape(1, -1, 1, 1))
        self.slices = nn.ModuleList()
        self.lins = nn.ModuleList()
        start = 0
        for s in slices:
            layers = []
            conv_at = convs[s]
            for i in range(start, max(conv_at) + 2):
                if i in conv_at:
                    w = state_dict[conv_at[i] + ".weight"].float()
                    if w.shape[-1] != 3 or w.shape[-2] != 3:
                        raise ConfigError(f"{where}: a {tuple(w.shape[-2:])} convolution in slice {s}: only the VGG "
                                          "variant (3×3 convolutions, lpips.LPIPS(net='vgg')) is supported")
                    conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
                    conv.weight.data.copy_(w)
                    conv.bias.data.copy_(state_dict[conv_at[i] + ".bias"].float())
                    layers.append(conv)
                elif i - 1 in conv_at:
                    layers.append(nn.ReLU())
                else:
                    layers.append(nn.MaxPool2d(2, 2))
            start = max(conv_at) + 2
            self.slices.append(nn.Sequential(*layers))
            w = state_dict[lins[s - 1]].float()
            lin = nn.Conv2d(w.shape[1], 1, 1, bias=False)
            lin.weight.data.copy_(w)
            self.lins.append(lin)
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        return cls(read_weights(path), where=f"--lpips_weights {path}")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        d = 0.0
        for block, lin in zip(self.slices, self.lins):
            h = block(h)
            f = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            fx, fy = f.chunk(2)
            d = d + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return d
