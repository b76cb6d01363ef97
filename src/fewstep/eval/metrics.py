"""Fréchet distance between image sets under pluggable feature extractors, and digit fidelity.

An extractor is any callable ``images [N, 3, H, W] in [0, 1] → features [N, D]`` with a ``name``.
Offline by default: the shipped digit classifier's penultimate layer. Inception (the usual FID) goes
through torchmetrics when the user has its weights; tests use a fixed random conv net in its place.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½) (Dowson & Landau 1982; FID, Heusel et al. 2017).

    Tr((Σ₁ Σ₂)^½) is computed as Σ √λ of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (same eigenvalues as
    Σ₁ Σ₂), which stays real and stable when the covariances are singular (fewer samples than features).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


class DigitFeatures:
    """Penultimate features (128-d) of the shipped MNIST classifier."""

    name = "digit-classifier"

    def __init__(self, model=None):
        from .digits import load_digit_classifier

        self.model = model or load_digit_classifier()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images.float().cpu())


class RandomConvFeatures:
    """A fixed random-weight conv net: a stand-in for Inception in tests (no weights to download)."""

    name = "random-conv"

    def __init__(self, dim: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(32, 3, 3, 3, generator=g) / 3
        self.w2 = torch.randn(dim, 32, 3, 3, generator=g) / 10

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float().cpu(), size=(32, 32), mode="bilinear", align_corners=False)
        x = F.max_pool2d(F.relu(F.conv2d(x, self.w1, padding=1)), 2)
        x = F.relu(F.conv2d(x, self.w2, padding=1))
        return x.mean((2, 3))


class InceptionFeatures:
    """The standard FID features (Inception-v3 pool3, 2048-d) through torchmetrics, from local weights.

    torchmetrics downloads the FID Inception weights on first use; offline, pass ``weights_path`` to
    the ``pt_inception-2015-12-05`` file or pre-populate torch's hub cache.
    """

    name = "inception-v3"

    def __init__(self, weights_path: str | None = None):
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError:
            raise RuntimeError("Inception features need torchmetrics and torch-fidelity: "
                               "pip install 'fewstep[eval]' torch-fidelity") from None
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=weights_path).eval()
        except Exception as e:
            raise RuntimeError(f"could not load Inception weights ({type(e).__name__}: {e}); offline, pass the "
                               "path of pt_inception-2015-12-05-6726825d.pth as weights_path") from None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.clamp(0, 1) * 255).to(torch.uint8)
        return self.net(x).reshape(len(x), -1)


EXTRACTORS = {"digits": DigitFeatures, "inception": InceptionFeatures, "random": RandomConvFeatures}


def frechet_distance_between(extractor, images_a: torch.Tensor, images_b: torch.Tensor,
                             batch_size: int = 256) -> float:
    def feats(x):
        return torch.cat([extractor(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    return frechet_distance(*feature_stats(feats(images_a)), *feature_stats(feats(images_b)))


@torch.no_grad()
def digit_accuracy(images: torch.Tensor, labels: torch.Tensor, model=None) -> float:
    """How often the shipped classifier reads the digit the prompt asked for."""
    from .digits import load_digit_classifier

    model = model or load_digit_classifier()
    preds = torch.cat([model(images[i:i + 512].float().cpu()).argmax(1) for i in range(0, len(images), 512)])
    return float((preds == labels.cpu()).float().mean())


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
