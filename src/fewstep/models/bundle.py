"""The model bundle: one adapter between methods and a diffusers model family.

A method asks the bundle to encode a batch (latents + condition), to run a denoiser on
(z_t, t, condition), to make a trainable copy of the denoiser and to build the pipeline that vanilla
diffusers runs. Everything family-specific (text encoders, micro-conditioning, VAE quirks) stays
here, so the methods read the same for SD1.x/2.x and the families added later.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..diffusion.schedule import NoiseSchedule

Cond = dict[str, torch.Tensor]


def cat_cond(*conds: Cond) -> Cond:
    """Stack several conditions along the batch (e.g. cond ‖ uncond for one CFG forward)."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def check_teacher_path(path: str, revision: str | None = None) -> str:
    """Make sure ``path`` is a diffusers model folder (or a hub id); return the folder to read."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(
                f"--pretrained_teacher_model {path} is a file, not a diffusers folder. Single-file "
                "checkpoints (.safetensors/.ckpt) must be converted first: "
                "StableDiffusionPipeline.from_single_file(path).save_pretrained(folder)"
            )
        has_denoiser = (p / "unet" / "config.json").is_file() or (p / "transformer" / "config.json").is_file()
        if not has_denoiser or not (p / "model_index.json").is_file():
            raise ConfigError(
                f"--pretrained_teacher_model {path} is not a diffusers model folder: expected "
                "model_index.json and unet/config.json (or transformer/config.json) inside it. Point at the folder written by "
                "pipeline.save_pretrained(...), or convert a single-file checkpoint with from_single_file"
            )
        return str(p)
    if path.count("/") == 1 and not path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(path, revision=revision, allow_patterns=["*.json", "*.txt", "*.safetensors"])
        except Exception as e:  # offline, private, or missing repo
            raise ConfigError(
                f"--pretrained_teacher_model {path}: no such folder, and the hub could not provide it "
                f"({type(e).__name__}: {e}). Download it first or pass a local diffusers folder."
            ) from None
    raise ConfigError(f"--pretrained_teacher_model {path}: no such folder")


class SDBundle:
    """Stable Diffusion 1.x/2.x: CLIP text encoder, AutoencoderKL, UNet2DConditionModel."""

    family = "sd"

    def __init__(self, root: str, tokenizer, text_encoder, vae, unet, scheduler_config: dict,
                 vae_encode_batch_size: int = 32):
        self.root = root
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.schedule = NoiseSchedule.from_scheduler_config(scheduler_config)
        self.vae_encode_batch_size = vae_encode_batch_size
        self._uncond: Cond | None = None

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, revision: str | None = None, vae_path: str | None = None,
             weights: bool = True, vae_encode_batch_size: int = 32, text_encoders: bool = True) -> SDBundle:
        """Load the teacher. With ``weights=False`` only configs are read (for --dry_run); with
        ``text_encoders=False`` the text encoder is not loaded (training from a cache)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        root = check_teacher_path(path, revision)
        index = json.loads((Path(root) / "model_index.json").read_text())
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if part not in index:
                raise ConfigError(f"{root}/model_index.json has no {part!r}: not a Stable Diffusion pipeline")
        sched_cfg = DDPMScheduler.load_config(root, subfolder="scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
        vae_root, vae_sub = (vae_path, None) if vae_path else (root, "vae")
        if weights:
            # fp32 whatever the stored dtype: trainable copies start from it, and methods cast frozen
            # parts to the mixed-precision dtype themselves.
            unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch.float32)
            vae = AutoencoderKL.from_pretrained(vae_root, subfolder=vae_sub, torch_dtype=torch.float32)
            text_encoder = (CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=torch.float32)
                            if text_encoders else None)
        else:
            unet = UNet2DConditionModel.load_config(root, subfolder="unet")
            vae = AutoencoderKL.load_config(vae_root, subfolder=vae_sub)
            text_encoder = CLIPTextConfig.from_pretrained(root, subfolder="text_encoder")
        bundle = cls(root, tokenizer, text_encoder, vae, unet, sched_cfg, vae_encode_batch_size)
        if weights:
            for m in (bundle.unet, bundle.vae, bundle.text_encoder):
                if m is not None:
                    m.requires_grad_(False).eval()
        return bundle

    def to(self, device, dtype=None, unet_dtype=None) -> SDBundle:
        """Move the frozen parts; the VAE and text encoder go to ``dtype``, the teacher to ``unet_dtype``."""
        for m, dt in ((self.text_encoder, dtype), (self.vae, dtype), (self.unet, unet_dtype)):
            if m is None:
                continue
            m.to(device)
            if dt is not None and dt != m.dtype:
                m.to(dtype=dt)
        self.schedule.to(device)
        self._uncond = None
        self._text_dtype = dtype
        return self

    # ---- cached inputs (fewstep cache) -------------------------------------------------------
    text_cache: dict[str, Cond] | None = None  # prompt → text-encoder outputs, when training from a cache
    _text_dtype = None

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

    def load_text_encoders(self) -> None:
        from transformers import CLIPTextModel

        self.text_encoder = CLIPTextModel.from_pretrained(self.root, subfolder="text_encoder", dtype=torch.float32)
        self.text_encoder.requires_grad_(False).eval().to(self.device, self._text_dtype)

    def latents_from_moments(self, moments: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Scaled latents from cached posterior moments, as :meth:`encode_images` makes them (a sample,
        or with ``sample=False`` the posterior mean)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(moments.to(self.device, non_blocking=True).float())
        return (dist.sample() if sample else dist.mode()).contiguous() * self.scaling_factor

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    # ---- conditioning ----------------------------------------------------------------------
    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Cond:
        """The text encoder's outputs (what a cache stores): CLIP hidden states, tokenised exactly as
        StableDiffusionPipeline does."""
        if self.text_encoder is None:
            return self._cached_text(prompts)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.text_encoder.device)
        hidden = self.text_encoder(ids)[0]
        return {"encoder_hidden_states": hidden}

    def cond_from_text(self, text: Cond, size=None, original_size=None, crop_top_left=None) -> Cond:
        """The denoiser's condition from text-encoder outputs (SD: the hidden states themselves)."""
        return text

    def encode_text(self, prompts: list[str], size=None, original_size=None, crop_top_left=None) -> Cond:
        """The denoiser's condition for ``prompts`` at image ``size`` (h, w)."""
        return self.cond_from_text(self.embed_text(prompts), size, original_size, crop_top_left)

    def uncond(self, batch_size: int, size=None) -> Cond:
        """The unconditional input of classifier-free guidance: the empty prompt's embedding."""
        if self._uncond is None:
            self._uncond = self.encode_text([""])
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in self._uncond.items()}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Scaled VAE latents, sampled from the posterior (``sample=False``: its mean, a deterministic
        regression target), in chunks of vae_encode_batch_size."""
        pixels = pixels.to(self.vae.device, self.vae.dtype, non_blocking=True)  # async from pinned memory
        parts = [self.vae.encode(chunk).latent_dist.sample() if sample else self.vae.encode(chunk).latent_dist.mode()
                 for chunk in pixels.split(self.vae_encode_batch_size)]
        # Contiguous: the VAE may return channels-last tensors, and torch.randn_like(x0) draws different
        # numbers for a different memory layout, which would make runs depend on the conv backend.
        return torch.cat(parts).float().contiguous() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1]."""
        x = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

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
        micro-conditioning (SDXL) from each sample's original size and crop."""
        text = self.batch_text(batch, drop_prob)
        x0 = self.batch_latents(batch)
        size = (x0.shape[-2] * self.vae_scale, x0.shape[-1] * self.vae_scale)  # pixels (h, w)
        return x0, self.cond_from_text(text, size, batch.get("original_size"), batch.get("crop_top_left"))

    # ---- denoiser ------------------------------------------------------------------------
    def predict(self, net, z: torch.Tensor, t: torch.Tensor, cond: Cond, timestep_cond=None) -> torch.Tensor:
        """Raw denoiser output (ε, v or x₀, per ``self.schedule.prediction_type``)."""
        dtype = next(net.parameters()).dtype
        if torch.is_autocast_enabled(z.device.type):
            dtype = z.dtype  # autocast casts inside; keep inputs as they are
        extra = {}
        if "text_embeds" in cond:  # SDXL micro-conditioning
            extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(dtype),
                                          "time_ids": cond["time_ids"].to(dtype)}
        out = net(z.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                  timestep_cond=None if timestep_cond is None else timestep_cond.to(dtype), **extra).sample
        return out if out.dtype == torch.float64 else out.float().contiguous()  # float64 kept for gradient checks
        # contiguous: a channels-last network (--channels_last) returns channels-last tensors, and
        # torch.randn_like on those would draw other noise than the plain run does.

    def new_denoiser(self, **config_overrides):
        """A trainable fp32 copy of the teacher UNet, with config changes (e.g. time_cond_proj_dim).

        New layers (the guidance embedding's ``cond_proj``) keep their fresh initialisation; every
        teacher weight is copied, which the strict check below guarantees.
        """
        from diffusers import UNet2DConditionModel

        # Private keys out: "_use_default_values" would make from_config ignore the overrides.
        cfg = {k: v for k, v in self.unet.config.items() if not k.startswith("_")}
        cfg.update(config_overrides)
        student = UNet2DConditionModel.from_config(cfg)
        missing, unexpected = student.load_state_dict(self.unet.state_dict(), strict=False)
        allowed = {k for k in student.state_dict() if k.startswith("time_embedding.cond_proj")}
        if unexpected or set(missing) - allowed:
            raise RuntimeError(f"teacher weights do not fit the student: missing {missing}, unexpected {unexpected}")
        if student.time_embedding.cond_proj is not None:
            # Zero-init the guidance projection so the student starts as exactly the teacher; the
            # reference scripts leave it random, which perturbs every prediction at step 0.
            torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        return student.float().train()

    # ---- export --------------------------------------------------------------------------
    @property
    def pipeline_cls(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def pipeline(self, unet, scheduler):
        """The vanilla diffusers pipeline running ``unet`` with ``scheduler`` and this bundle's parts."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


def load_bundle(path: str, **kw) -> SDBundle:
    """Pick the family from the folder's model_index.json (SD1.x/2.x, SDXL, SD3). A fewstep LoRA
    folder loads its base model with the LoRA fused in, and its LCMScheduler config."""
    from .lora import META_FILE, fuse_into, is_lora_folder

    if is_lora_folder(path):
        meta = json.loads((Path(path) / META_FILE).read_text())
        bundle = load_bundle(meta["base_model"], **kw)
        if kw.get("weights", True):
            fuse_into(bundle, path)
        sched = Path(path) / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            bundle.scheduler_config = json.loads(sched.read_text())
        return bundle
    root = check_teacher_path(path, kw.get("revision"))
    index = json.loads((Path(root) / "model_index.json").read_text()) if (Path(root) / "model_index.json").is_file() else {}
    from .sd3 import SD3Bundle, is_sd3

    if is_sd3(index):
        return SD3Bundle.load(path, **{k: v for k, v in kw.items() if k != "use_fix_crop_and_size"})
    if "text_encoder_2" in index:
        from .sdxl import SDXLBundle, check_sdxl

        check_sdxl(index, root)
        return SDXLBundle.load(path, **kw)
    if kw.pop("use_fix_crop_and_size", False):
        import logging

        logging.getLogger("fewstep").warning("--use_fix_crop_and_size only applies to SDXL teachers; %s is SD", root)
    return SDBundle.load(path, **kw)


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
