"""The Qwen-Image family: QwenImagePipeline, with its MMDiT (QwenImageTransformer2DModel, 20 B parameters
in the released model), the Qwen2.5-VL text encoder and a causal 3-D VAE (AutoencoderKLQwenImage).

Where Qwen-Image differs from the other flow transformers, and how this module keeps the methods' view
(latents (B, C, h, w), a condition dict, the velocity v = ε − x₀ at timestep 1000·σ) unchanged:

- **Latents.** The VAE encodes videos: an image is one frame, (B, 3, T=1, H, W) → (B, C, 1, h, w), and
  latents are normalised per channel with the config's ``latents_mean`` / ``latents_std``,
  z ← (z − μ_c) / σ_c, instead of one shift and scale. The frame axis is added and removed here.
- **Packing.** The transformer reads each 2×2 patch of latents as one token, (B, C, h, w) ↔
  (B, h/2·w/2, 4C), with ``img_shapes`` [(1, h/2, w/2)] for its 3-D RoPE: done inside :meth:`denoise`,
  in the pipeline's own element order, so that outputs and the CFG rescaling below match it exactly.
- **Text.** The vanilla pipeline's ``encode_prompt`` wraps each prompt in its chat template, takes the
  Qwen2.5-VL's last hidden states, drops the template's 34-token system prefix and pads the rest with a
  mask of the valid tokens. Here the embeddings and mask are zero-padded further to a fixed length (the
  pipeline's ``max_sequence_length``, 512, where it truncates) so that prompts of any length stack,
  concatenate and cache like every other family's conditions; :meth:`denoise` trims them back to the
  longest prompt of the batch and passes no mask when every token is valid: exactly the transformer
  inputs the pipeline builds.
- **Timesteps.** The transformer takes σ = timestep / 1000. The scheduler shifts by resolution
  (``use_dynamic_shifting``: μ linear in the packed sequence length, :meth:`shift_mu`); the pipeline
  samples K steps on its own grid σ = linspace(1, 1/K, K) (:meth:`default_sigmas`), which the
  scheduler then shifts and stretches so the last σ is ``shift_terminal`` (0.02).
- **True CFG.** The pipeline guides with a negative prompt at ``true_cfg_scale`` and rescales the
  guided velocity of every token to the norm of the conditional one (:meth:`guide`):
  v = v̂ · ‖v_c‖ / ‖v̂‖ with v̂ = v_u + s (v_c − v_u), norms over each token's 4C values. The negative
  prompt is the empty one (DiffSynth-Studio's default; in diffusers any ``negative_prompt``, even "",
  switches true CFG on). As in the pipeline, cond and uncond run as two forwards (:attr:`cfg_batch`).
- **LoRA.** Besides diffusers' file, the DiffSynth-Studio layout (keys ``transformer_blocks.0.attn.
  to_q.lora_A.default.weight``, what ``Qwen-Image-Distill-LoRA`` ships), which diffusers' Qwen LoRA
  converter reads too (:meth:`lora_layouts`).

No guidance embedding (``guidance_embeds`` is false in the released model): LCD bakes its guidance in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError
from .base import Cond, ModelBundle, Tap, check_teacher_path, checked_index, config_parts

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# DiffSynth-Studio's Qwen-Image-Distill-LoRA targets: the joint attention of both streams, the second
# linear of both MLPs and the AdaLN modulation of both streams.
QWEN_LORA_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                     "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1"]
DIFFSYNTH_FILE = "pytorch_lora_weights_diffsynth.safetensors"
DEFAULT_SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size: latents per side at its default size


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents → (B, h/2 · w/2, 4C) tokens of 2×2 patches, in QwenImagePipeline's order."""
    B, C, h, w = z.shape
    return z.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack`: (B, h/2 · w/2, 4C) → (B, C, h, w)."""
    B, _, D = x.shape
    return x.reshape(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)


class QwenImageBundle(ModelBundle):
    family = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    denoiser_name = "transformer"
    text_parts = ("text_encoder",)
    lora_targets = QWEN_LORA_TARGETS
    guidance_embedding = None
    step_generator = False  # the pipeline calls scheduler.step without its generator
    cfg_batch = False
    pipeline_guidance_scale = False  # true_cfg_scale (guidance_call_kwargs); guidance_scale only warns here
    negative_prompt = ""

    # The text condition's fixed length: the pipeline's max_sequence_length (512 by default; a folder trained
    # with another records it in fewstep_sampling.json's pipeline_kwargs, as SD3 folders do).
    max_sequence_length = 512

    def __init__(self, root, parts, scheduler_config, vae_encode_batch_size=32):
        super().__init__(root, parts, scheduler_config, vae_encode_batch_size)
        hints = Path(root) / "fewstep_sampling.json"
        if hints.is_file():
            n = json.loads(hints.read_text()).get("pipeline_kwargs", {}).get("max_sequence_length")
            if n:
                self.max_sequence_length = int(n)

    @staticmethod
    def matches(index: dict) -> bool:
        return "transformer" in index and index.get("_class_name") == "QwenImagePipeline"

    @classmethod
    def load(cls, path: str, revision: str | None = None, vae_path: str | None = None, weights: bool = True,
             vae_encode_batch_size: int = 32, text_encoders: bool = True, **family_options) -> QwenImageBundle:
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImagePipeline,
            QwenImageTransformer2DModel,
        )

        root = check_teacher_path(path, revision)
        checked_index(root, PARTS, "not a QwenImagePipeline")
        sched_cfg = FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler")
        if not weights:
            return cls(root, config_parts(root, vae_path, QwenImageTransformer2DModel, AutoencoderKLQwenImage), sched_cfg, vae_encode_batch_size)
        kw = {}
        if vae_path:
            kw["vae"] = AutoencoderKLQwenImage.from_pretrained(vae_path, torch_dtype=torch.float32)
        if not text_encoders:  # training from a cache: the tokenizer stays, the 7 B encoder is not loaded
            kw["text_encoder"] = None
        pipe = QwenImagePipeline.from_pretrained(root, torch_dtype=torch.float32, **kw)
        bundle = cls(root, dict(pipe.components), sched_cfg, vae_encode_batch_size)
        bundle.freeze()
        return bundle

    def load_text_encoders(self) -> None:
        from transformers import Qwen2_5_VLForConditionalGeneration

        enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.root, subfolder="text_encoder",
                                                                 dtype=torch.float32)
        self.parts["text_encoder"] = enc.requires_grad_(False).eval().to(self.device, self._text_dtype)

    def call_kwargs(self) -> dict:
        return {} if self.max_sequence_length == 512 else {"max_sequence_length": self.max_sequence_length}

    def _pipe(self):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(**{k: self.parts.get(k) for k in PARTS})

    # ---- latents ---------------------------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        return 2 ** len(self.part_config("vae")["temperal_downsample"])  # the pipeline's vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.part_config("vae")["z_dim"]

    @property
    def default_resolution(self) -> int:
        return DEFAULT_SAMPLE_SIZE * self.vae_scale  # 1024 px for the released model, as the pipeline

    def _stats(self, like: torch.Tensor, frames: bool = False):
        """μ_c and 1/σ_c of the latent normalisation, shaped to broadcast over ``like``, computed as the
        pipelines do (the reciprocal after the cast)."""
        cfg = self.part_config("vae")
        shape = (1, cfg["z_dim"], 1, 1, 1) if frames else (1, cfg["z_dim"], 1, 1)
        mean = torch.tensor(cfg["latents_mean"]).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(cfg["latents_std"]).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def _scale(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._stats(latents)
        return (latents - mean) * inv_std  # QwenImageImg2ImgPipeline's normalisation

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        px = pixels.to(self.vae.device, self.vae.dtype)
        return torch.cat([self.vae.encode(c.unsqueeze(2)).latent_dist.parameters[:, :, 0]
                          for c in px.split(self.vae_encode_batch_size)])

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, sample: bool = True) -> torch.Tensor:
        pixels = pixels.to(self.vae.device, self.vae.dtype, non_blocking=True)
        parts = []
        for chunk in pixels.split(self.vae_encode_batch_size):
            dist = self.vae.encode(chunk.unsqueeze(2)).latent_dist  # one-frame videos
            parts.append((dist.sample() if sample else dist.mode())[:, :, 0])
        return self._scale(torch.cat(parts).float().contiguous())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype).unsqueeze(2)
        mean, inv_std = self._stats(z, frames=True)
        x = self.vae.decode(z / inv_std + mean).sample[:, :, 0]  # as QwenImagePipeline decodes
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def use_cache(self, text_cache) -> None:
        super().use_cache(text_cache)
        # The causal VAE counts its encoder's convolutions on every decode (clear_cache): an empty
        # module stands in for the dropped encoder.
        self.vae.encoder = torch.nn.Module()

    # ---- conditioning ----------------------------------------------------------------------------
    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Cond:
        """The pipeline's prompt embeddings and valid-token mask, zero-padded to max_sequence_length."""
        if self.parts.get("text_encoder") is None:
            return self._cached_text(prompts)
        L = self.max_sequence_length
        embeds, mask = self._pipe().encode_prompt(list(prompts), device=self.device, max_sequence_length=L)
        B, n = embeds.shape[:2]
        if mask is None:  # the pipeline drops an all-valid mask
            mask = torch.ones(B, n, dtype=torch.long, device=embeds.device)
        return {"encoder_hidden_states": F.pad(embeds, (0, 0, 0, L - n)),
                "encoder_hidden_states_mask": F.pad(mask.to(embeds.dtype), (0, L - n))}

    @staticmethod
    def _text_inputs(cond: Cond):
        """(embeddings, mask or None) as the pipeline hands them to the transformer: trimmed to the
        batch's longest prompt (valid tokens come first), no mask when every token is valid."""
        valid = cond["encoder_hidden_states_mask"] > 0
        n = int(valid.sum(1).max())  # one host sync per forward, as the pipeline's own mask handling
        valid = valid[:, :n]
        return cond["encoder_hidden_states"][:, :n], None if bool(valid.all()) else valid.long()

    # ---- denoiser -------------------------------------------------------------------------------
    def denoise(self, net, z, t, cond, w=None):
        """The velocity v̂ = ε̂ − x̂₀ at scheduler timestep t (= 1000·σ; the transformer takes σ)."""
        if w is not None:
            raise ConfigError("Qwen-Image transformers have no guidance embedding")
        B, _, h, w_ = z.shape
        if h % 2 or w_ % 2:
            raise ConfigError(f"latents of {h}×{w_} cannot be packed into 2×2 patches: use a --resolution that is "
                              f"a multiple of {2 * self.vae_scale}")
        dtype = self._cast_dtype(net, z)
        embeds, mask = self._text_inputs(cond)
        t = torch.as_tensor(t, device=z.device)
        timestep = (t.expand(B) if t.ndim == 0 else t).to(dtype) / 1000  # the pipeline's order of casts
        out = net(hidden_states=pack(z).to(dtype), timestep=timestep, encoder_hidden_states=embeds.to(dtype),
                  encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w_ // 2)]] * B, return_dict=False)[0]
        if out.dim() != 3:  # not tokens: a discriminator head's logits read through this network
            return out
        return self._output(unpack(out, h, w_))

    def new_denoiser(self, guidance_dim: int | None = None):
        from diffusers import QwenImageTransformer2DModel

        if guidance_dim is not None:
            raise ConfigError("Qwen-Image transformers have no guidance embedding to add")
        cfg = {k: v for k, v in self.denoiser.config.items() if not k.startswith("_")}
        student = QwenImageTransformer2DModel.from_config(cfg)
        student.load_state_dict(self.denoiser.state_dict(), strict=True)
        return student.float().train()

    def feature_tap(self, net) -> Tap:
        """The image stream after the middle dual-stream block, tokens folded back to the patch grid:
        (B, inner_dim, h/2, w/2) for latents of h × w."""
        blocks = net.transformer_blocks
        mid = blocks[(len(blocks) - 1) // 2]
        shape = {}

        def attach(callback):
            def grab_size(module, args, kwargs):
                shape["hw"] = tuple(kwargs["img_shapes"][0][0][1:])

            def fold(module, args, output):
                tokens = output[1]  # (encoder_hidden_states, hidden_states)
                h, w = shape["hw"]
                callback(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w))

            return [net.register_forward_pre_hook(grab_size, with_kwargs=True), mid.register_forward_hook(fold)]

        return Tap(net.config.num_attention_heads * net.config.attention_head_dim, attach,
                   lambda h, w: (h // 2, w // 2))  # tokens of 2×2 latent patches

    # ---- guidance -------------------------------------------------------------------------------
    def guide(self, cond, uncond, scale=None, *, w=None):
        """True CFG as QwenImagePipeline computes it: v̂ = v_u + s (v_c − v_u), then each token rescaled to
        the norm of the conditional velocity, ‖v_c‖ / ‖v̂‖, norms over the token's packed 4C values."""
        s = scale if w is None else 1 + w
        if torch.is_tensor(s):
            s = s.reshape(-1, 1, 1)  # per sample, over (tokens, channels)
        h, w_ = cond.shape[-2:]
        c, u = pack(cond), pack(uncond)
        guided = u + s * (c - u)
        guided = guided * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
        return unpack(guided, h, w_)

    def guide_prediction(self, cond, uncond, z, t, scale=None, *, w=None, schedule=None):
        # The rescaling is not linear: guide the velocity, then read x̂₀ and ε̂ off the guided one.
        return (schedule or self.schedule).predict(self.guide(cond.raw, uncond.raw, scale, w=w), z, t)

    def guidance_call_kwargs(self, guidance_scale) -> dict:
        # The whole CFG of the call (the card passes no guidance_scale: pipeline_guidance_scale).
        if guidance_scale is not None and guidance_scale > 1:
            return {"negative_prompt": self.negative_prompt, "true_cfg_scale": guidance_scale}
        return {"true_cfg_scale": 1.0}  # (the pipeline's default 4.0 only warns without a negative prompt)

    # ---- schedules ------------------------------------------------------------------------------
    def pipeline_latents(self, z: torch.Tensor) -> torch.Tensor:
        return pack(z)  # the pipeline steps its scheduler on packed latents

    def model_latents(self, z: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack(z, height // self.vae_scale, width // self.vae_scale)

    def shift_mu(self, height: int, width: int) -> float | None:
        """QwenImagePipeline's μ: linear in the packed image sequence length, from base_shift at
        base_image_seq_len to max_shift at max_image_seq_len (the pipeline's arithmetic, term by term)."""
        cfg = self.scheduler_config
        seq = (height // (self.vae_scale * 2)) * (width // (self.vae_scale * 2))
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        b = base_shift - m * base_len
        return seq * m + b

    def default_sigmas(self, num_inference_steps: int, scheduler=None) -> list[float] | None:
        import numpy as np

        if scheduler is not None and getattr(scheduler.config, "use_flow_sigmas", False):
            return None  # a scheduler on flow sigmas (DPM-Solver) makes its own grid and takes none
        # The pipeline's own grid (not the scheduler's default one, which ends at σ = 1/1000)
        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()

    # ---- LoRA -----------------------------------------------------------------------------------
    def lora_layouts(self, peft_state_dict, alpha) -> dict[str, dict]:
        """DiffSynth-Studio's layout: the transformer's own module names with peft's adapter name
        (``….lora_A.default.weight``), no prefix and no alpha (its loader applies B·A at scale 1), so the
        scale α / r is folded into B (exact when α = r, the default). diffusers' Qwen converter reads it
        (it drops "default." and prefixes "transformer.")."""
        out = {}
        for key, v in peft_state_dict.items():
            for ab in ("lora_A", "lora_B"):
                if key.endswith(f".{ab}.weight"):
                    rank = v.shape[0] if ab == "lora_A" else v.shape[1]
                    scale = 1.0 if ab == "lora_A" or alpha == rank else alpha / rank
                    out[key[: -len(".weight")] + ".default.weight"] = (v * scale if scale != 1.0 else v).contiguous()
        return {DIFFSYNTH_FILE: out}
