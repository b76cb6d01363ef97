"""The Stable Diffusion 3 / 3.5 family: a flow-matching MMDiT (SD3Transformer2DModel) with diffusers'
FlowMatchEulerDiscreteScheduler, two CLIP text encoders with projection and an optional T5 encoder.

Flow matching: z_σ = (1 − σ) x₀ + σ ε, the transformer predicts the velocity v = ε − x₀ at timestep
1000·σ, and the Euler sampler steps z ← z + (σ_next − σ) v (:class:`fewstep.diffusion.schedule.
FlowSchedule`). The prompt is encoded by the vanilla pipeline's own ``encode_prompt`` (both CLIPs'
penultimate states side by side, zero-padded to the joint width, then the T5 states, or zeros when
the folder has no T5), so condition tensors equal those the pipeline builds; the unconditional input
of CFG is the empty prompt encoded the same way, as the pipeline's default negative prompt is.
SD3.5 differs only in its config (QK-norm, MMDiT-X dual attention layers), which diffusers reads.

No guidance embedding: an LCD student bakes its guidance range in, as LCM-LoRA does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError
from .base import Cond, ModelBundle, Tap, check_teacher_path, checked_index, config_parts

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
# diffusers' SD3 DreamBooth-LoRA default: the joint attention's projections of both streams.
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class SD3Bundle(ModelBundle):
    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    text_parts = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_targets = SD3_LORA_TARGETS
    guidance_embedding = None
    step_generator = False

    # The length of the T5 part of the prompt embedding (T5 states, or zeros without T5): the pipeline's
    # ``max_sequence_length`` (256 by default). A folder trained with another records it in
    # fewstep_sampling.json's ``pipeline_kwargs``, and every encoding here and in its cards uses it.
    max_sequence_length = 256

    def __init__(self, root, parts, scheduler_config, vae_encode_batch_size=32):
        super().__init__(root, parts, scheduler_config, vae_encode_batch_size)
        hints = Path(root) / "fewstep_sampling.json"
        if hints.is_file():
            n = json.loads(hints.read_text()).get("pipeline_kwargs", {}).get("max_sequence_length")
            if n:
                self.max_sequence_length = int(n)

    @staticmethod
    def matches(index: dict) -> bool:
        return "transformer" in index and str(index.get("_class_name", "")).startswith("StableDiffusion3")

    def call_kwargs(self) -> dict:
        return {} if self.max_sequence_length == 256 else {"max_sequence_length": self.max_sequence_length}

    @classmethod
    def load(cls, path: str, revision: str | None = None, vae_path: str | None = None, weights: bool = True,
             vae_encode_batch_size: int = 32, text_encoders: bool = True, **family_options) -> SD3Bundle:
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            SD3Transformer2DModel,
            StableDiffusion3Pipeline,
        )

        root = check_teacher_path(path, revision)
        index = checked_index(root, PARTS, "not a StableDiffusion3Pipeline")
        sched_cfg = FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler")
        if not weights:
            return cls(root, config_parts(root, vae_path, SD3Transformer2DModel, AutoencoderKL), sched_cfg, vae_encode_batch_size)
        kw = {}
        if vae_path:
            kw["vae"] = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32)
        # A folder without T5 (text_encoder_3 null) loads only when that is said explicitly, in vanilla
        # diffusers too: StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None).
        for k in ("text_encoder_3", "tokenizer_3"):
            if not index.get(k) or index[k][0] is None:
                kw[k] = None
        if not text_encoders:  # training from a cache: the tokenizers stay, the encoders are not loaded
            kw.update({k: None for k in ("text_encoder", "text_encoder_2", "text_encoder_3")})
        pipe = StableDiffusion3Pipeline.from_pretrained(root, torch_dtype=torch.float32, **kw)
        bundle = cls(root, dict(pipe.components), sched_cfg, vae_encode_batch_size)
        bundle.freeze()
        return bundle

    def load_text_encoders(self) -> None:
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        index = json.loads((Path(self.root) / "model_index.json").read_text())
        for name, cls in (("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection),
                          ("text_encoder_3", T5EncoderModel)):
            if index.get(name) and index[name][0] is not None:
                enc = cls.from_pretrained(self.root, subfolder=name, dtype=torch.float32)
                self.parts[name] = enc.requires_grad_(False).eval().to(self.device, self._text_dtype)

    def card_load_args(self) -> str:
        # diffusers loads a folder without T5 only when told so (text_encoder_3 is null in model_index.json);
        # the tokenizer tells, as it is loaded even when a cache stands in for the encoders
        return ", text_encoder_3=None, tokenizer_3=None" if self.parts.get("tokenizer_3") is None else ""

    def _pipe(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(**{k: self.parts.get(k) for k in (
            "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
            "text_encoder_3", "tokenizer_3")})

    # ---- conditioning ----------------------------------------------------------------------------
    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Cond:
        if self.parts.get("text_encoder") is None:
            return self._cached_text(prompts)
        embeds, _, pooled, _ = self._pipe().encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                                           device=self.device, do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    # ---- denoiser -------------------------------------------------------------------------------
    def denoise(self, net, z, t, cond, w=None):
        """The velocity v̂ = ε̂ − x̂₀ at scheduler timestep t (= 1000·σ)."""
        if w is not None:
            raise ConfigError("SD3 transformers have no guidance embedding")
        dtype = self._cast_dtype(net, z)
        t = torch.as_tensor(t, device=z.device)
        out = net(hidden_states=z.to(dtype), timestep=t.expand(z.shape[0]) if t.ndim == 0 else t,
                  encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                  pooled_projections=cond["pooled_projections"].to(dtype), return_dict=False)[0]
        return self._output(out)

    def new_denoiser(self, guidance_dim: int | None = None):
        from diffusers import SD3Transformer2DModel

        if guidance_dim is not None:
            raise ConfigError("SD3 transformers have no guidance embedding to add")
        cfg = {k: v for k, v in self.denoiser.config.items() if not k.startswith("_")}
        student = SD3Transformer2DModel.from_config(cfg)
        student.load_state_dict(self.denoiser.state_dict(), strict=True)
        return student.float().train()

    def feature_tap(self, net) -> Tap:
        """The image stream after the middle joint block, tokens folded back to the patch grid:
        (B, inner_dim, h/(8·patch), w/(8·patch))."""
        blocks = net.transformer_blocks
        mid = blocks[(len(blocks) - 1) // 2]
        p = net.config.patch_size
        shape = {}

        def attach(callback):
            def grab_size(module, args, kwargs):
                z = kwargs.get("hidden_states", args[0] if args else None)
                shape["hw"] = (z.shape[-2] // p, z.shape[-1] // p)

            def fold(module, args, output):
                tokens = output[1]  # (encoder_hidden_states, hidden_states)
                h, w = shape["hw"]
                callback(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w))

            return [net.register_forward_pre_hook(grab_size, with_kwargs=True), mid.register_forward_hook(fold)]

        inner = net.config.num_attention_heads * net.config.attention_head_dim
        return Tap(inner, attach, lambda h, w: (h // p, w // p))

    # ---- a teacher from scratch (`fewstep train-teacher`) ---------------------------------------
    # An SD3-architecture MMDiT on 32 px digits: 8×8×4 latents in 2×2 patches (16 image tokens), two
    # small CLIP encoders side by side (their 2 × text_dim states fill the joint width), no T5; their
    # encoders keep their random initialisation (frozen), as the UNet presets' encoder does.
    ARCH_PRESETS = {
        # ("a handwritten digit seven" is 6 CLIP tokens with its start and end: 8 leave room.)
        "mnist-flow": dict(image_size=32, vae_channels=(32, 64, 64), text_dim=64, max_length=8, num_layers=4,
                           heads=4, head_dim=24, shift=1.0),
        "tiny-flow": dict(image_size=32, vae_channels=(32, 32, 64), text_dim=32, max_length=16, num_layers=2,
                          heads=2, head_dim=16, shift=3.0),
    }
    # No T5: its zero block would be 256 tokens by default (16 times the 16 image tokens) and carries no
    # information; these teachers train with, and record, a block as long as the CLIP part.
    default_prediction_type = "flow"

    @classmethod
    def from_scratch(cls, preset: str, tokenizer_dir: Path, seed: int, prediction_type: str | None = None,
                     vae=None) -> SD3Bundle:
        """A fresh StableDiffusion3Pipeline-layout model (random weights) from a preset; ``vae``: a
        trained AutoencoderKL to reuse (its latents get SD3's (z − shift)·scale with shift 0)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        from .sd import new_clip_tokenizer

        if prediction_type not in (None, "flow"):
            raise ConfigError(f"--prediction_type {prediction_type}: a flow-matching teacher predicts the velocity; "
                              "drop --prediction_type")
        p = cls.ARCH_PRESETS[preset]
        tok = new_clip_tokenizer(tokenizer_dir, p["max_length"])
        torch.manual_seed(seed)

        def clip():
            return CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(tok), hidden_size=p["text_dim"], intermediate_size=4 * p["text_dim"],
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=p["max_length"],
                projection_dim=p["text_dim"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)).requires_grad_(False).eval()

        te, te2 = clip(), clip()
        n = len(p["vae_channels"])
        if vae is None:
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(p["vae_channels"]),
                                latent_channels=4, layers_per_block=1, norm_num_groups=16,
                                sample_size=p["image_size"], scaling_factor=1.0, shift_factor=0.0)
        else:
            vae.register_to_config(shift_factor=vae.config.get("shift_factor") or 0.0)
        latent = p["image_size"] // 2 ** (len(vae.config.block_out_channels) - 1)
        inner = p["heads"] * p["head_dim"]
        transformer = SD3Transformer2DModel(
            sample_size=latent, patch_size=2, in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels, num_layers=p["num_layers"], attention_head_dim=p["head_dim"],
            num_attention_heads=p["heads"], joint_attention_dim=2 * p["text_dim"], caption_projection_dim=inner,
            pooled_projection_dim=2 * p["text_dim"], pos_embed_max_size=latent)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=p["shift"])
        parts = {"transformer": transformer, "vae": vae, "text_encoder": te, "tokenizer": tok, "text_encoder_2": te2,
                 "tokenizer_2": tok, "text_encoder_3": None, "tokenizer_3": None}
        bundle = cls(str(tokenizer_dir), parts, {**sched.config, "_class_name": type(sched).__name__})
        bundle.max_sequence_length = p["max_length"]
        return bundle
