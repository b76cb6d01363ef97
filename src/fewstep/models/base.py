"""The model interface: what every family module gives the methods, the samplers and the commands.

A method never asks which model it distils. It asks the bundle for capabilities and for predictions:

- **schedule** (:mod:`fewstep.diffusion.schedule`): α(t), σ(t), the training levels, the prediction
  type; :meth:`ModelBundle.predict` returns x̂₀ and ε̂ whatever the network's parameterisation;
- **conditioning**: :meth:`embed_text` (what a cache stores), :meth:`cond_from_text` (plus the
  family's micro-conditioning), :meth:`uncond` (CFG's unconditional input), :meth:`encode_batch`;
- **latents**: :meth:`encode_images` / :meth:`decode` with the family's VAE shift and scale,
  :meth:`latent_shape`, :attr:`default_resolution`;
- **the denoiser**: :attr:`denoiser` (the teacher network), :meth:`denoise` (raw output),
  :meth:`new_denoiser` (a trainable copy, with a guidance embedding where :attr:`guidance_embedding`
  says the architecture takes one), :meth:`feature_tap` (features for a discriminator head);
- **guidance**: :meth:`guide` / :meth:`guide_prediction` (classifier-free guidance as the family's
  pipeline combines cond and uncond), :attr:`cfg_batch`, :meth:`guidance_input` (what a denoiser with a
  guidance embedding takes), :meth:`guidance_call_kwargs` / :attr:`pipeline_guidance_scale` (cards);
- **sampling**: :meth:`timestep_kwargs` (explicit timesteps, the pipeline's own sampling grid
  (:meth:`default_sigmas`) and resolution-dependent shifts in the form the family's scheduler and
  pipeline take), :meth:`schedule_for` (the training schedule at a size), :meth:`pipeline_latents` /
  :meth:`model_latents` (the layout the pipeline steps its scheduler in);
- **outputs**: :attr:`denoiser_name`, :meth:`pipeline`, :attr:`lora_targets`, :meth:`lora_save_kwargs`,
  :meth:`kohya_lora` / :meth:`lora_layouts`.

A family is one module in this package that subclasses :class:`ModelBundle`, implements the abstract
parts and registers itself in :data:`fewstep.models.bundle.FAMILIES` (docs/ADDING.md).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import ConfigError
from ..diffusion.guidance import (
    cat_cond,  # noqa: F401  (re-exported: methods import it with the bundle)
    cfg,
    cfg_prediction,
)
from ..diffusion.schedule import Prediction, Schedule, schedule_from_config

Cond = dict[str, torch.Tensor]


def check_teacher_path(path: str, revision: str | None = None) -> str:
    """Make sure ``path`` is a diffusers model folder (or a hub id); return the folder to read."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(
                f"--pretrained_teacher_model {path} is a file, not a diffusers folder. Single-file "
                "checkpoints (.safetensors/.ckpt) must be converted first: "
                "DiffusionPipeline.from_single_file(path).save_pretrained(folder)"
            )
        has_denoiser = (p / "unet" / "config.json").is_file() or (p / "transformer" / "config.json").is_file()
        if not has_denoiser or not (p / "model_index.json").is_file():
            raise ConfigError(
                f"--pretrained_teacher_model {path} is not a diffusers model folder: expected "
                "model_index.json and unet/config.json (or transformer/config.json) inside it. Point at the folder "
                "written by pipeline.save_pretrained(...), or convert a single-file checkpoint with from_single_file"
            )
        return str(p)
    if path.count("/") == 1 and not path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            # weights in the part folders only: FLUX.1 / SD3 / SD1.5 repositories also hold single-file
            # checkpoints at their root (23.8 GB for FLUX.1-dev) that the diffusers layout does not use
            return snapshot_download(path, revision=revision, allow_patterns=["*.json", "*.txt", "*/*.safetensors",
                                                                              "*.model"])
        except Exception as e:  # offline, private, or missing repo
            raise ConfigError(
                f"--pretrained_teacher_model {path}: no such folder, and the hub could not provide it "
                f"({type(e).__name__}: {e}). Download it first or pass a local diffusers folder."
            ) from None
    raise ConfigError(f"--pretrained_teacher_model {path}: no such folder")


def checked_index(root: str, parts, what: str) -> dict:
    """A teacher folder's model_index.json, refused (naming ``what`` it is not) when a part is missing."""
    index = json.loads((Path(root) / "model_index.json").read_text())
    missing = [p for p in parts if not index.get(p) or index[p][0] is None]
    if missing:
        raise ConfigError(f"{root}/model_index.json lacks {', '.join(missing)}: {what}")
    return index


def config_parts(root: str, vae_path: str | None, denoiser_cls, vae_cls, denoiser: str = "transformer") -> dict:
    """The configs (no weights) of a teacher's denoiser and VAE, for ``--dry_run`` (``weights=False``)."""
    return {denoiser: denoiser_cls.load_config(root, subfolder=denoiser),
            "vae": vae_cls.load_config(vae_path or root, subfolder=None if vae_path else "vae")}


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    """The dtype frozen networks are held in under --mixed_precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def frozen_copy(module):
    """A detached, frozen deep copy (EMA targets)."""
    m = copy.deepcopy(module)
    m.requires_grad_(False)
    return m


def free_disk_bytes(path: str) -> int:
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def net_config(net) -> dict:
    """The diffusers config of a denoiser, through accelerate's DDP wrapper or DeepSpeed engine (``.module``;
    the engine's own ``config`` is DeepSpeed's); {} for modules that have none (a fake-score wrapper)."""
    for m in (getattr(net, "module", None), net):
        cfg = getattr(m, "config", None)
        if cfg is not None:
            return cfg
    return {}


@dataclass
class Tap:
    """Where a discriminator head reads a denoiser's features: ``attach(callback)`` hooks the network so
    that every forward calls ``callback(feature_map)`` with a (B, channels, h, w) tensor, and returns the
    hook handles; ``size(h, w)``: that map's (h, w) for latents of h × w (a head is built for it)."""

    channels: int
    attach: Callable[[Callable[[torch.Tensor], None]], list]
    size: Callable[[int, int], tuple[int, int]]


class ModelBundle:
    """One diffusers teacher: its parts (modules, or their configs when loaded with ``weights=False``),
    its noise schedule, and everything methods need from the family. Subclasses implement the
    methods that raise NotImplementedError and set the class attributes below."""

    family: ClassVar[str] = ""  # a label for logs, caches and model cards; nothing outside models/ branches on it
    pipeline_class: ClassVar[str] = ""  # the diffusers pipeline class of the folder
    denoiser_name: ClassVar[str] = ""  # the pipeline folder and argument of the denoiser ("unet", "transformer")
    text_parts: ClassVar[tuple[str, ...]] = ()  # text-encoder parts, dropped when training from a cache
    lora_targets: ClassVar[list[str]] = []  # default LoRA target modules of the denoiser
    # "new": the student can get a fresh guidance-scale embedding (LCM's w embedding); "native": the
    # architecture already takes a guidance scale (guidance-distilled teachers); None: neither.
    guidance_embedding: ClassVar[str | None] = None
    micro_conditioning: ClassVar[bool] = False  # image size / crop conditioning (--use_fix_crop_and_size applies)
    # Boolean settings that assert "the teacher is this family" (PaddleMIX's --is_sdxl): the config marks
    # such a field, the family that it names lists it here, so config.py names no family.
    family_flags: ClassVar[tuple[str, ...]] = ()
    # Whether the family's pipeline hands its generator to ``scheduler.step`` (StableDiffusionPipeline
    # does; StableDiffusion3Pipeline does not, so a stochastic scheduler there draws from torch's global
    # RNG): the sampler does the same, so that images equal the vanilla pipeline's.
    step_generator: ClassVar[bool] = True
    # Whether samplers run CFG's uncond and cond as one batch (the SD pipelines do); False where the
    # pipeline runs two forwards (Qwen-Image: prompts of different lengths), so that images equal its own.
    cfg_batch: ClassVar[bool] = True
    # Whether the pipeline call takes the sampling CFG scale as ``guidance_scale`` (model cards pass it);
    # False where that argument only feeds a guidance embedding the family's released models lack and
    # its CFG arguments all come from :meth:`guidance_call_kwargs` (QwenImagePipeline: ``true_cfg_scale``).
    pipeline_guidance_scale: ClassVar[bool] = True

    def __init__(self, root: str, parts: dict[str, Any], scheduler_config: dict, vae_encode_batch_size: int = 32):
        self.root = root
        self.parts = parts
        self.scheduler_config = dict(scheduler_config)
        self.schedule: Schedule = self._base_schedule()
        self.vae_encode_batch_size = vae_encode_batch_size
        self._uncond: Cond | None = None
        self.text_cache: dict[str, Cond] | None = None  # prompt → text-encoder outputs, training from a cache
        self._text_dtype = None

    # ---- family hooks ------------------------------------------------------------------------
    @staticmethod
    def matches(index: dict) -> bool:
        """Whether a folder's model_index.json is this family's pipeline (the factory's test)."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: str, revision: str | None = None, vae_path: str | None = None, weights: bool = True,
             vae_encode_batch_size: int = 32, text_encoders: bool = True, **family_options) -> ModelBundle:
        """The teacher folder; ``weights=False`` reads configs only (--dry_run), ``text_encoders=False``
        skips the text encoders (training from a cache)."""
        raise NotImplementedError

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Cond:
        """The text encoders' outputs for ``prompts``, tokenised exactly as the family's pipeline does."""
        raise NotImplementedError

    def load_text_encoders(self) -> None:
        """Load the text encoders after all (a prompt a cache lacks)."""
        raise NotImplementedError

    def denoise(self, net, z: torch.Tensor, t: torch.Tensor, cond: Cond, w: torch.Tensor | None = None):
        """The raw output of denoiser ``net`` (the teacher or a copy of it) at (z, t, cond); ``w``: the
        guidance weight (CFG scale − 1) for denoisers that embed it."""
        raise NotImplementedError

    def new_denoiser(self, guidance_dim: int | None = None):
        """A trainable fp32 copy of the teacher's denoiser; ``guidance_dim``: with a fresh guidance-scale
        embedding of that size (families with ``guidance_embedding == "new"``)."""
        raise NotImplementedError

    def feature_tap(self, net) -> Tap:
        """Where a discriminator reads ``net``'s features (its bottleneck / a middle block)."""
        raise NotImplementedError

    # ---- parts --------------------------------------------------------------------------------
    @property
    def denoiser(self):
        return self.parts[self.denoiser_name]

    @denoiser.setter
    def denoiser(self, net) -> None:
        self.parts[self.denoiser_name] = net

    @property
    def vae(self):
        return self.parts["vae"]

    @vae.setter
    def vae(self, vae) -> None:
        self.parts["vae"] = vae

    def part_config(self, name: str) -> dict:
        """A part's config, whether the part is loaded (a module) or only configured (a dict)."""
        part = self.parts.get(name)
        return part if isinstance(part, dict) else getattr(part, "config", {})

    def modules(self) -> dict[str, torch.nn.Module]:
        return {k: m for k, m in self.parts.items() if isinstance(m, torch.nn.Module)}

    def freeze(self) -> None:
        for m in self.modules().values():
            m.requires_grad_(False).eval()

    def to_meta(self, text_encoders: bool = True) -> ModelBundle:
        """Every network part of the folder (``model_index.json``'s diffusers and transformers models) as a
        module of its architecture on the meta device: shapes and dtypes without storage, for counting
        what a run holds (--dry_run). ``text_encoders=False``: none, as when training from a cache. Configs
        already held (a --pretrained_vae_model's) are used. (Built under ``torch.device("meta")``, not
        accelerate's ``init_empty_weights``, whose re-registered parameters would untie tied embeddings.)"""
        import importlib
        import json

        index = json.loads((Path(self.root) / "model_index.json").read_text())
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] not in ("diffusers", "transformers"):
                continue
            cls = getattr(importlib.import_module(spec[0]), spec[1], None)
            if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
                continue  # tokenizers, schedulers
            if name in self.text_parts and not text_encoders:
                self.parts[name] = None
                continue
            held = self.parts.get(name)
            with torch.device("meta"):
                if spec[0] == "diffusers":
                    cfg = held if isinstance(held, dict) else cls.load_config(self.root, subfolder=name)
                    module = cls.from_config(cfg)
                else:
                    module = cls(cls.config_class.from_pretrained(self.root, subfolder=name))
            self.parts[name] = module.requires_grad_(False).eval()
        return self

    def part_dtype(self, name: str, dtype: torch.dtype | None) -> torch.dtype | None:
        """The dtype a frozen part is held in under the run's ``dtype`` (a family may keep one in fp32)."""
        return dtype

    def to(self, device, dtype=None, denoiser_dtype=None) -> ModelBundle:
        """Move the frozen parts; the VAE and text encoders go to ``dtype``, the denoiser to ``denoiser_dtype``."""
        for name, m in self.modules().items():
            dt = denoiser_dtype if name == self.denoiser_name else self.part_dtype(name, dtype)
            m.to(device)
            if dt is not None and dt != m.dtype:
                m.to(dtype=dt)
        self.schedule.to(device)
        self._uncond = None
        self._text_dtype = dtype
        return self

    @property
    def device(self) -> torch.device:
        return self.vae.device

    # ---- latents ------------------------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.part_config("vae")["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.part_config(self.denoiser_name)["in_channels"]

    @property
    def scaling_factor(self) -> float:
        return self.part_config("vae")["scaling_factor"]

    @property
    def shift_factor(self) -> float:
        return self.part_config("vae").get("shift_factor") or 0.0

    @property
    def default_resolution(self) -> int:
        """The pixel size the teacher was configured for (its denoiser's latent sample size × VAE factor)."""
        return self.part_config(self.denoiser_name)["sample_size"] * self.vae_scale

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this: pixels per latent cell, times the denoiser's patch (a
        patchifying transformer needs whole patches; any other size would be rounded down silently)."""
        return self.vae_scale * int(self.part_config(self.denoiser_name).get("patch_size") or 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of one sample's latents for an image of ``height`` × ``width`` pixels."""
        return (self.latent_channels, height // self.vae_scale, width // self.vae_scale)

    def _scale(self, latents: torch.Tensor) -> torch.Tensor:
        # (latent − shift) · scale: SD3/FLUX subtract a shift, SD's is 0; ``- 0.0`` is exact.
        shift = self.shift_factor
        return (latents - shift) * self.scaling_factor if shift else latents * self.scaling_factor

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's moments (mean ‖ logvar) of ``pixels`` in [-1, 1] (what a cache stores)."""
        px = pixels.to(self.vae.device, self.vae.dtype)
        return torch.cat([self.vae.encode(c).latent_dist.parameters for c in px.split(self.vae_encode_batch_size)])

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Scaled VAE latents, sampled from the posterior (``sample=False``: its mean, a deterministic
        regression target), in chunks of vae_encode_batch_size."""
        pixels = pixels.to(self.vae.device, self.vae.dtype, non_blocking=True)  # async from pinned memory
        parts = [self.vae.encode(chunk).latent_dist.sample() if sample else self.vae.encode(chunk).latent_dist.mode()
                 for chunk in pixels.split(self.vae_encode_batch_size)]
        # Contiguous: the VAE may return channels-last tensors, and torch.randn_like(x0) draws different
        # numbers for a different memory layout, which would make runs depend on the conv backend.
        return self._scale(torch.cat(parts).float().contiguous())

    def latents_from_moments(self, moments: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Scaled latents from cached posterior moments, as :meth:`encode_images` makes them (a sample,
        or with ``sample=False`` the posterior mean)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(moments.to(self.device, non_blocking=True).float())
        return self._scale((dist.sample() if sample else dist.mode()).contiguous())

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], not clamped, with gradients to ``latents`` (an image-space loss's input)."""
        z = latents.to(self.vae.dtype) / self.scaling_factor
        if self.shift_factor:
            z = z + self.shift_factor
        return self.vae.decode(z).sample.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1]."""
        return (self.decode_pixels(latents) / 2 + 0.5).clamp(0, 1)

    # ---- conditioning -------------------------------------------------------------------------
    def cond_from_text(self, text: Cond, size=None, original_size=None, crop_top_left=None) -> Cond:
        """The denoiser's condition from text-encoder outputs (by default the outputs themselves)."""
        return text

    def encode_text(self, prompts: list[str], size=None, original_size=None, crop_top_left=None) -> Cond:
        """The denoiser's condition for ``prompts`` at image ``size`` (h, w)."""
        return self.cond_from_text(self.embed_text(prompts), size, original_size, crop_top_left)

    def uncond(self, batch_size: int, size=None, like: Cond | None = None) -> Cond:
        """The unconditional input of classifier-free guidance: the empty prompt, encoded as the family's
        pipeline encodes its default negative prompt. ``like``: the conditional input this one is paired
        with in a CFG batch; a family with micro-conditioning gives the unconditional pass the same
        image-size conditioning (as its pipeline does), others ignore it."""
        if self._uncond is None:
            self._uncond = self.encode_text([""])
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in self._uncond.items()}

    def use_cache(self, text_cache: dict[str, Cond]) -> None:
        """Train from cached latents and text embeddings: drop the VAE encoder (only decoding is left,
        for validation images) and serve prompts from ``text_cache``; text encoders are not needed."""
        self.text_cache = text_cache
        self.vae.encoder = None
        self.vae.quant_conv = None

    def _cached_text(self, prompts: list[str]) -> Cond:
        missing = [p for p in prompts if p not in self.text_cache]
        if missing:
            # A prompt the cache lacks (a validation prompt added later): load the encoders once.
            import logging

            logging.getLogger("fewstep").warning(
                "prompt %r is not in the cache: loading the text encoder(s) (re-run `fewstep cache` with "
                "this --validation_prompts to avoid it)", missing[0])
            self.load_text_encoders()
            return self.embed_text(prompts)
        return {k: torch.cat([self.text_cache[p][k] for p in prompts]).to(self.device)
                for k in self.text_cache[prompts[0]]}

    def text_loaded(self) -> bool:
        return all(isinstance(self.parts.get(p), torch.nn.Module) for p in self.text_parts if p in self.parts)

    def batch_text(self, batch: dict[str, Any], drop_prob: float = 0.0) -> Cond:
        """Text-encoder outputs for a batch's captions, each dropped to "" with prob ``drop_prob``. A
        batch from ``fewstep cache`` carries them already: no text encoder runs (or is loaded)."""
        captions = list(batch["caption"])
        drop = [False] * len(captions)
        if drop_prob > 0:
            drop = (torch.rand(len(captions)) < drop_prob).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        cached = {k[len("cached_text."):]: v for k, v in batch.items() if k.startswith("cached_text.")}
        if not cached:
            return self.embed_text(captions)
        text = {k: v.to(self.device, non_blocking=True) for k, v in cached.items()}
        if any(drop):
            empty = self.embed_text([""])  # (the cache holds the empty prompt's embedding)
            rows = torch.tensor(drop, device=self.device)
            text = {k: torch.where(rows.view(-1, *[1] * (v.dim() - 1)), empty[k].to(v.dtype), v)
                    for k, v in text.items()}
        return text

    def batch_latents(self, batch: dict[str, Any], sample: bool = True) -> torch.Tensor:
        """Scaled x₀ latents of a batch's images: VAE-encoded pixels, or the cache's posterior moments."""
        if "cached_moments" in batch:
            return self.latents_from_moments(batch["cached_moments"], sample)
        return self.encode_images(batch["pixel_values"], sample)

    def encode_batch(self, batch: dict[str, Any], drop_prob: float = 0.0) -> tuple[torch.Tensor, Cond]:
        """(x₀ latents, condition) of a data batch; captions dropped to "" with prob ``drop_prob``, the
        micro-conditioning (where the family has it) from each sample's original size and crop."""
        text = self.batch_text(batch, drop_prob)
        x0 = self.batch_latents(batch)
        size = (x0.shape[-2] * self.vae_scale, x0.shape[-1] * self.vae_scale)  # pixels (h, w)
        return x0, self.cond_from_text(text, size, batch.get("original_size"), batch.get("crop_top_left"))

    # ---- predictions ----------------------------------------------------------------------------
    def predict(self, net, z: torch.Tensor, t: torch.Tensor, cond: Cond, w: torch.Tensor | None = None,
                schedule: Schedule | None = None) -> Prediction:
        """x̂₀ and ε̂ of ``net`` at (z, t, cond), whatever its parameterisation (ε, v, x₀, flow velocity)."""
        return (schedule or self.schedule).predict(self.denoise(net, z, t, cond, w), z, t)

    def embeds_guidance(self, net) -> bool:
        """Whether ``net`` takes the guidance scale as an input (so samplers run no CFG batch for it)."""
        return False

    def guidance_input(self, scale):
        """The ``w`` :meth:`denoise` takes for CFG scale ``scale`` (a number or a per-sample tensor) in a
        denoiser that embeds guidance: LCM's weight w = s − 1 for a new embedding (``"new"``); families
        whose architecture takes the scale itself (``"native"``) return ``scale``."""
        return scale - 1.0

    # ---- classifier-free guidance -----------------------------------------------------------------
    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, scale=None, *, w=None) -> torch.Tensor:
        """Classifier-free guidance of raw denoiser outputs as the family's pipeline combines them (scale
        s, or the LCM papers' w = s − 1; :func:`fewstep.diffusion.guidance.cfg`). Samplers and methods
        guide only through here, so a family whose pipeline modifies the guided output (a rescaling)
        keeps its own guided ODE everywhere."""
        return cfg(cond, uncond, scale, w=w)

    def guide_prediction(self, cond: Prediction, uncond: Prediction, z: torch.Tensor, t: torch.Tensor, scale=None,
                         *, w=None, schedule: Schedule | None = None) -> Prediction:
        """The guided (x̂₀, ε̂) at (z, t) from the conditional and unconditional predictions. CFG is linear,
        so by default x̂₀ and ε̂ are guided directly; a family whose guidance is not linear guides the raw
        output (:meth:`guide`) and converts that."""
        return cfg_prediction(cond, uncond, scale, w=w)

    def guidance_call_kwargs(self, guidance_scale) -> dict:
        """Pipeline-call arguments (besides ``guidance_scale``, which the card passes where
        :attr:`pipeline_guidance_scale` says the pipeline takes it) that make the family's pipeline apply
        guidance as fewstep's sampler does, for model cards and fewstep_sampling.json's ``pipeline_kwargs``;
        {} where ``guidance_scale`` alone does. ``guidance_scale`` may be None (a card without one)."""
        return {}

    # The layout the family's pipeline keeps its latents (and steps its scheduler) in; samplers that draw
    # noise per step must draw it in that layout to equal the pipeline (FLUX, Qwen-Image pack 2×2 patches).
    def pipeline_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents in the pipeline's layout."""
        return z

    def model_latents(self, z: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The inverse of :meth:`pipeline_latents` for an image of ``height`` × ``width`` pixels."""
        return z

    @staticmethod
    def _cast_dtype(net, z: torch.Tensor) -> torch.dtype:
        """The dtype to feed ``net``: its weights' dtype, or the input's own under autocast (which casts
        inside each layer)."""
        if torch.is_autocast_enabled(z.device.type):
            return z.dtype
        return next(net.parameters()).dtype

    @staticmethod
    def _output(out: torch.Tensor) -> torch.Tensor:
        # float64 is kept for gradient checks; contiguous: a channels-last network (--channels_last)
        # returns channels-last tensors, and torch.randn_like on those would draw other noise.
        return out if out.dtype == torch.float64 else out.float().contiguous()

    # ---- schedules and sampling ------------------------------------------------------------------
    def _base_schedule(self) -> Schedule:
        cfg = self.scheduler_config
        if cfg.get("use_dynamic_shifting"):
            res = self.default_resolution
            return schedule_from_config(cfg, mu=self.shift_mu(res, res))
        return schedule_from_config(cfg)

    def shift_mu(self, height: int, width: int) -> float | None:
        """The resolution-dependent timestep shift of flow schedulers with ``use_dynamic_shifting`` (the
        pipeline's ``mu``), or None where the scheduler has a static shift."""
        return None

    def schedule_for(self, height: int, width: int) -> Schedule:
        """The schedule a method trains with at this image size (the timestep shift may depend on it)."""
        mu = self.shift_mu(height, width) if self.scheduler_config.get("use_dynamic_shifting") else None
        if mu is None:
            return self.schedule
        sched = schedule_from_config(self.scheduler_config, mu=mu)
        # (a bundle of configs only, as --dry_run and model cards read it, has no device)
        return sched.to(self.device) if isinstance(self.parts.get("vae"), torch.nn.Module) else sched

    def default_sigmas(self, num_inference_steps: int, scheduler=None) -> list[float] | None:
        """The sigmas the family's pipeline hands ``scheduler.set_timesteps`` when the caller gives none
        (FLUX, Qwen-Image: ``linspace(1, 1/N, N)``), or None where the pipeline lets the scheduler make its
        own grid."""
        return None

    def timestep_kwargs(self, height: int, width: int, timesteps: list | None = None,
                        num_inference_steps: int | None = None, scheduler=None) -> dict:
        """``set_timesteps`` / pipeline-call arguments for sampling at this size: the resolution-dependent
        ``mu`` where the scheduler shifts by resolution, and explicit timesteps in the form the scheduler
        takes (DDPM tables: ``timesteps``; flow schedulers: ``sigmas``, which they shift themselves,
        so the unshifted values are given). Without explicit timesteps, ``num_inference_steps`` and
        ``scheduler`` give the grid the family's pipeline would pass (:meth:`default_sigmas`)."""
        kw: dict = {}
        mu = self.shift_mu(height, width) if self.scheduler_config.get("use_dynamic_shifting") else None
        if mu is not None:
            kw["mu"] = mu
        if timesteps is None:
            sigmas = self.default_sigmas(num_inference_steps, scheduler) if num_inference_steps else None
            if sigmas is not None:
                kw["sigmas"] = sigmas
            return kw
        if self.schedule.kind != "flow":
            return {**kw, "timesteps": [int(t) for t in timesteps]}
        # (the table's shift at this size; no device needed, so configs-only bundles answer too)
        shift = schedule_from_config(self.scheduler_config, mu=mu).shift if mu is not None else self.schedule.shift
        sig = [float(t) / self.schedule.num_train_timesteps for t in timesteps]
        return {**kw, "sigmas": [s / (shift - (shift - 1) * s) for s in sig]}  # the inverse of the shift map

    # ---- LoRA -----------------------------------------------------------------------------------
    def lora_save_kwargs(self, layers: dict[str, torch.Tensor], metadata: dict) -> dict:
        """Arguments of the pipeline's ``save_lora_weights`` for the denoiser's LoRA layers."""
        return {f"{self.denoiser_name}_lora_layers": layers, f"{self.denoiser_name}_lora_adapter_metadata": metadata}

    def kohya_lora(self, peft_state_dict: dict[str, torch.Tensor], alpha: float) -> dict | None:
        """The LoRA in kohya / ComfyUI key layout, or None where the family has none."""
        return None

    def lora_layouts(self, peft_state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, dict]:
        """The LoRA in the family's other key layouts, by file name (next to ``pytorch_lora_weights.
        safetensors``): the kohya file where :meth:`kohya_lora` gives one."""
        from .lora import KOHYA_FILE

        kohya = self.kohya_lora(peft_state_dict, alpha)
        return {} if kohya is None else {KOHYA_FILE: kohya}

    # ---- outputs --------------------------------------------------------------------------------
    @property
    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def pipeline(self, denoiser, scheduler):
        """The vanilla diffusers pipeline running ``denoiser`` with ``scheduler`` and this bundle's parts."""
        import inspect

        accepted = inspect.signature(self.pipeline_cls.__init__).parameters
        parts = {k: v for k, v in self.parts.items() if k in accepted}
        return self.pipeline_cls(**{**parts, self.denoiser_name: denoiser, "scheduler": scheduler})

    def call_kwargs(self) -> dict:
        """Pipeline-call arguments this folder's conditioning depends on (besides steps, guidance and
        timesteps), recorded in ``fewstep_sampling.json`` as ``pipeline_kwargs`` and shown in model cards."""
        return {}

    def card_load_args(self) -> str:
        """Keyword arguments (Python source, with a leading comma) that ``DiffusionPipeline.from_pretrained``
        needs for this folder, for the code blocks of model cards; "" when it needs none."""
        return ""

    def describe(self) -> str:
        """One line for --dry_run: the family and the denoiser's shape."""
        d = self.part_config(self.denoiser_name)
        kind = (f"flow matching, shift {self.schedule.shift:g}" if self.schedule.kind == "flow" else "DDPM table")
        return (f"{self.root} (family {self.family}, {self.pipeline_class}, {self.denoiser_name} "
                f"in_channels={d.get('in_channels')}, prediction_type={self.schedule.prediction_type}, {kind} "
                f"[{self.scheduler_config.get('_class_name')}], default resolution {self.default_resolution} px)")
