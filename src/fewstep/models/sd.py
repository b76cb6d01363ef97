"""Stable Diffusion 1.x/2.x: CLIP text encoder, AutoencoderKL, UNet2DConditionModel on a DDPM table
(ε or v prediction). The other UNet family (SDXL) builds on this module's bundle."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError
from ..diffusion.guidance import guidance_scale_embedding
from .base import Cond, ModelBundle, Tap, check_teacher_path, net_config

# diffusers' LCM-LoRA scripts: attention projections, feed-forward, transformer in/out projections,
# resnet convolutions and time-embedding projections, down/up-samplers (ALGORITHMS.md §2).
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                     "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class SDBundle(ModelBundle):
    """Stable Diffusion 1.x/2.x: CLIP text encoder, AutoencoderKL, UNet2DConditionModel."""

    family = "sd"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_name = "unet"
    text_parts = ("text_encoder",)
    lora_targets = UNET_LORA_TARGETS
    guidance_embedding = "new"  # UNet2DConditionModel's time_cond_proj_dim (LCM's w embedding)

    @staticmethod
    def matches(index: dict) -> bool:
        return "unet" in index

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, revision: str | None = None, vae_path: str | None = None, weights: bool = True,
             vae_encode_batch_size: int = 32, text_encoders: bool = True, **family_options) -> SDBundle:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        root = check_teacher_path(path, revision)
        index = json.loads((Path(root) / "model_index.json").read_text())
        for part in PARTS:
            if part not in index:
                raise ConfigError(f"{root}/model_index.json has no {part!r}: not a Stable Diffusion pipeline")
        sched_cfg = DDPMScheduler.load_config(root, subfolder="scheduler")
        vae_root, vae_sub = (vae_path, None) if vae_path else (root, "vae")
        parts = {"tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")}
        if weights:
            # fp32 whatever the stored dtype: trainable copies start from it, and methods cast frozen
            # parts to the mixed-precision dtype themselves.
            parts["unet"] = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch.float32)
            parts["vae"] = AutoencoderKL.from_pretrained(vae_root, subfolder=vae_sub, torch_dtype=torch.float32)
            parts["text_encoder"] = (CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=torch.float32)
                                     if text_encoders else None)
        else:
            parts["unet"] = UNet2DConditionModel.load_config(root, subfolder="unet")
            parts["vae"] = AutoencoderKL.load_config(vae_root, subfolder=vae_sub)
            parts["text_encoder"] = CLIPTextConfig.from_pretrained(root, subfolder="text_encoder").to_dict()
        bundle = cls(root, parts, sched_cfg, vae_encode_batch_size)
        if weights:
            bundle.freeze()
        return bundle

    @property
    def tokenizer(self):
        return self.parts["tokenizer"]

    @property
    def text_encoder(self):
        return self.parts["text_encoder"]

    def load_text_encoders(self) -> None:
        from transformers import CLIPTextModel

        te = CLIPTextModel.from_pretrained(self.root, subfolder="text_encoder", dtype=torch.float32)
        self.parts["text_encoder"] = te.requires_grad_(False).eval().to(self.device, self._text_dtype)

    # ---- conditioning ----------------------------------------------------------------------
    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Cond:
        """CLIP hidden states, tokenised exactly as StableDiffusionPipeline does."""
        if self.text_encoder is None:
            return self._cached_text(prompts)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.text_encoder.device)
        hidden = self.text_encoder(ids)[0]
        return {"encoder_hidden_states": hidden}

    # ---- denoiser ------------------------------------------------------------------------
    def denoise(self, net, z, t, cond, w=None):
        """Raw UNet output (ε, v or x₀, per ``self.schedule.prediction_type``)."""
        dtype = self._cast_dtype(net, z)
        extra = {}
        if "text_embeds" in cond:  # SDXL micro-conditioning
            extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(dtype),
                                          "time_ids": cond["time_ids"].to(dtype)}
        w_emb = None
        if w is not None:
            w_emb = guidance_scale_embedding(w, net_config(net)["time_cond_proj_dim"]).to(z.device).to(dtype)
        out = net(z.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                  timestep_cond=w_emb, **extra).sample
        return self._output(out)

    def embeds_guidance(self, net) -> bool:
        return net_config(net).get("time_cond_proj_dim") is not None

    def new_denoiser(self, guidance_dim: int | None = None):
        """A trainable fp32 copy of the teacher UNet; with ``guidance_dim``, a guidance embedding
        (``time_cond_proj_dim``) of that size.

        The new layer (``cond_proj``) is zero-initialised; every teacher weight is copied, which the
        strict check below guarantees.
        """
        from diffusers import UNet2DConditionModel

        # Private keys out: "_use_default_values" would make from_config ignore the overrides.
        cfg = {k: v for k, v in self.denoiser.config.items() if not k.startswith("_")}
        if guidance_dim is not None:
            cfg["time_cond_proj_dim"] = guidance_dim
        student = UNet2DConditionModel.from_config(cfg)
        missing, unexpected = student.load_state_dict(self.denoiser.state_dict(), strict=False)
        allowed = {k for k in student.state_dict() if k.startswith("time_embedding.cond_proj")}
        if unexpected or set(missing) - allowed:
            raise RuntimeError(f"teacher weights do not fit the student: missing {missing}, unexpected {unexpected}")
        if student.time_embedding.cond_proj is not None:
            # Zero-init the guidance projection so the student starts as exactly the teacher; the
            # reference scripts leave it random, which perturbs every prediction at step 0.
            torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        return student.float().train()

    def feature_tap(self, net) -> Tap:
        """The UNet bottleneck: the mid-block's output, (B, last block channels, ⌈h/2^k⌉, ⌈w/2^k⌉),
        k the number of down blocks with a downsampler (all but the last; each halves, rounding up)."""

        def attach(callback):
            return [net.mid_block.register_forward_hook(lambda module, args, output: callback(output))]

        def size(h, w):
            for _ in range(len(net.config.block_out_channels) - 1):
                h, w = -(-h // 2), -(-w // 2)
            return h, w

        return Tap(net.config.block_out_channels[-1], attach, size)

    # ---- LoRA ---------------------------------------------------------------------------
    def kohya_lora(self, peft_state_dict, alpha):
        """kohya keys (``lora_unet_…`` with ``.alpha``) through diffusers' converter, with one fix on top:
        its ``alpha``, which the converter sets to the rank (right only when α == r)."""
        from diffusers.utils import convert_state_dict_to_kohya

        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state_dict.items()})
        for k in kohya:
            if k.endswith(".alpha"):  # the scale is alpha / rank
                kohya[k] = torch.tensor(float(alpha))
        return kohya

    def pipeline(self, denoiser, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=denoiser, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    # ---- a teacher from scratch (`fewstep train-teacher`) ---------------------------------------
    # Architecture presets: (image size, VAE channels, UNet channels, text width, tokenizer length).
    ARCH_PRESETS = {
        # MNIST: 32 px → 8×8×4 latents; about 6 M parameters in all (≈ 12 MB in fp16).
        "mnist": dict(image_size=32, vae_channels=(32, 64, 64), unet_channels=(64, 128, 128), text_dim=64,
                      attention_head_dim=8, max_length=16),
        # Tests: the smallest model that still has every part.
        "tiny": dict(image_size=32, vae_channels=(32, 32, 64), unet_channels=(32, 64, 64), text_dim=32,
                     attention_head_dim=8, max_length=16),
    }
    default_prediction_type = "epsilon"

    @classmethod
    def from_scratch(cls, preset: str, tokenizer_dir: Path, seed: int, prediction_type: str | None = None,
                     vae=None) -> SDBundle:
        """A fresh SD-layout model (random weights) from a preset; ``vae``: a trained AutoencoderKL to
        reuse instead of a fresh one."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        p = cls.ARCH_PRESETS[preset]
        tok = new_clip_tokenizer(tokenizer_dir, p["max_length"])
        torch.manual_seed(seed)
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=p["text_dim"], intermediate_size=4 * p["text_dim"], num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=p["max_length"], projection_dim=p["text_dim"],
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        n = len(p["vae_channels"])
        fresh_vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                                  up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(p["vae_channels"]),
                                  latent_channels=4, layers_per_block=1, norm_num_groups=16,
                                  sample_size=p["image_size"], scaling_factor=1.0)
        uc = p["unet_channels"]
        unet = UNet2DConditionModel(
            sample_size=p["image_size"] // 2 ** (n - 1), in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=tuple(uc),
            down_block_types=("CrossAttnDownBlock2D",) * (len(uc) - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(uc) - 1),
            cross_attention_dim=p["text_dim"], attention_head_dim=p["attention_head_dim"], norm_num_groups=16)
        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=prediction_type or cls.default_prediction_type,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        te.requires_grad_(False).eval()
        parts = {"tokenizer": tok, "text_encoder": te, "vae": vae if vae is not None else fresh_vae, "unet": unet}
        return cls(str(tokenizer_dir), parts, {**sched.config, "_class_name": type(sched).__name__})


def new_clip_tokenizer(out_dir: Path, max_length: int):
    """A CLIP tokenizer with the digit-caption vocabulary, written to ``out_dir`` (offline)."""
    from transformers import CLIPTokenizer

    from ..testing import DEFAULT_WORDS, write_clip_tokenizer

    write_clip_tokenizer(out_dir, DEFAULT_WORDS, max_length)
    return CLIPTokenizer.from_pretrained(str(out_dir))
