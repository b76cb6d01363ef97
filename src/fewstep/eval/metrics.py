"""Fréchet distance between image sets under pluggable feature extractors, and digit fidelity.

An extractor (:class:`FeatureExtractor`) is any callable ``images [N, 3, H, W] in [0, 1] → features
[N, D]`` with a ``name``; the ones here also take grey [N, 1, H, W] images. Offline by default: the
shipped digit classifier's penultimate layer. Inception (the usual FID) goes through torchmetrics when
the user has its weights; tests use a fixed random conv net in its place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F


@runtime_checkable
class FeatureExtractor(Protocol):
    """``name`` (recorded in reports) and ``__call__(images [N, 3, H, W] in [0, 1]) → features [N, D]``."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """float [N, 3, H, W] on the CPU from [N, 1 or 3, H, W]."""
    x = images.float().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D], in float64 numpy (unbiased covariance, N ≥ 2)."""
    f = np.asarray(features.detach().double().cpu().numpy() if torch.is_tensor(features) else features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"feature_stats needs features [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    root1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½) (Dowson & Landau 1982; FID, Heusel et al. 2017).

    Tr((Σ₁ Σ₂)^½) is computed as Σ √λ of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (same eigenvalues as
    Σ₁ Σ₂), which stays real and stable when the covariances are singular (fewer samples than features),
    where ``scipy.linalg.sqrtm(Σ₁ Σ₂)`` needs an ε·I offset and drops imaginary parts. Should an
    eigendecomposition not converge, both covariances get that offset (ε = 1e-6) and it is retried.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("frechet_distance: the statistics contain NaN or inf")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    try:
        tr_covmean = _trace_sqrt_product(s1, s2)
    except np.linalg.LinAlgError:
        offset = 1e-6 * np.eye(d)
        tr_covmean = _trace_sqrt_product(s1 + offset, s2 + offset)
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


class DigitFeatures:
    """Penultimate features (128-d) of the shipped MNIST classifier (or ``model``); any input size is
    resized to 32×32, RGB is averaged to grey."""

    name = "digit-classifier"

    def __init__(self, model=None):
        from .digits import load_digit_classifier

        self.model = model if model is not None else load_digit_classifier()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(_rgb(images)).float()


class RandomConvFeatures:
    """A fixed random-weight conv net: a stand-in for Inception in tests (no weights to download)."""

    name = "random-conv"

    def __init__(self, dim: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(32, 3, 3, 3, generator=g) / 3
        self.w2 = torch.randn(dim, 32, 3, 3, generator=g) / 10

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(_rgb(images), size=(32, 32), mode="bilinear", align_corners=False)
        x = F.max_pool2d(F.relu(F.conv2d(x, self.w1, padding=1)), 2)
        x = F.relu(F.conv2d(x, self.w2, padding=1))
        return x.mean((2, 3))


class InceptionFeatures:
    """The standard FID features (Inception-v3 pool3, 2048-d) through torchmetrics, from local weights.

    Needs the optional ``torchmetrics`` and ``torch-fidelity`` packages (``pip install 'fewstep[eval]'
    torch-fidelity``). torch-fidelity downloads the FID Inception weights on first use; offline, pass
    ``weights_path`` (``fewstep eval --inception_weights``) to a local copy of
    ``weights-inception-2015-12-05-6726825d.pth`` or put that file in torch's hub cache
    (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``).
    """

    name = "inception-v3"
    WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"

    def __init__(self, weights_path: str | None = None):
        import importlib.util

        missing = [m for m in ("torchmetrics", "torch_fidelity") if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeError(f"Inception features need {' and '.join(missing)} (not installed): "
                               "pip install 'fewstep[eval]' torch-fidelity, then give the FID Inception weights "
                               f"offline with weights_path / --inception_weights ({self.WEIGHTS_FILE}), or use "
                               "the offline digit features (--features digits)")
        if weights_path is not None and not Path(weights_path).is_file():
            raise RuntimeError(f"Inception weights not found at {weights_path} (expected a local copy of "
                               f"{self.WEIGHTS_FILE})")
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=weights_path).eval()
        except Exception as e:
            raise RuntimeError(f"could not load the FID Inception weights ({type(e).__name__}: {e}); offline, "
                               f"pass a local copy of {self.WEIGHTS_FILE} as weights_path (--inception_weights) "
                               "or put it in $TORCH_HOME/hub/checkpoints") from None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (_rgb(images).clamp(0, 1) * 255).to(torch.uint8)  # as torchmetrics' FID(normalize=True)
        dev = next(self.net.parameters()).device
        return self.net(x.to(dev)).reshape(len(x), -1).float().cpu()


EXTRACTORS = {"digits": DigitFeatures, "inception": InceptionFeatures, "random": RandomConvFeatures}


def frechet_distance_between(extractor: FeatureExtractor, images_a: torch.Tensor, images_b: torch.Tensor,
                             batch_size: int = 256) -> float:
    """Fréchet distance between two image sets ([N, 3 or 1, H, W] in [0, 1]) under ``extractor``'s features."""

    @torch.no_grad()
    def feats(x):
        return torch.cat([extractor(x[i:i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)])

    return frechet_distance(*feature_stats(feats(images_a)), *feature_stats(feats(images_b)))


@torch.no_grad()
def digit_accuracy(images: torch.Tensor, labels, model=None) -> float:
    """How often the classifier (the shipped one by default) reads the digit the prompt asked for;
    ``labels`` come from :func:`fewstep.eval.mnist.label_from_prompt` on each image's prompt."""
    from .digits import load_digit_classifier

    labels = torch.as_tensor(labels).long().cpu()
    if len(labels) != len(images) or len(images) == 0:
        raise ValueError(f"digit_accuracy: {len(images)} images but {len(labels)} labels")
    model = model if model is not None else load_digit_classifier()
    preds = torch.cat([model(images[i:i + 512].float().cpu()).argmax(1) for i in range(0, len(images), 512)])
    return float((preds == labels).double().mean())


class ClipScore:
    """CLIP score (Hessel et al. 2021): 100 · max(cos(image embedding, text embedding), 0), averaged.

    Runs a local ``transformers`` CLIPModel folder (nothing is downloaded); images are resized to the
    model's input size and normalised with its processor statistics.
    """

    def __init__(self, model_path: str):
        from transformers import CLIPModel, CLIPTokenizer

        self.path = str(model_path)
        try:
            self.model = CLIPModel.from_pretrained(model_path).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(model_path)
        except Exception as e:
            raise RuntimeError(f"--clip_model {model_path}: not a local CLIP model folder ({e})") from None
        cfg = self.model.config.vision_config
        self.size = cfg.image_size
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> float:
        x = F.interpolate(images.float().cpu(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.tokenizer.model_max_length)
        img = self.model.get_image_features(pixel_values=x)
        txt = self.model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = F.cosine_similarity(img, txt, dim=-1)
        return float((100 * cos.clamp(min=0)).mean())
