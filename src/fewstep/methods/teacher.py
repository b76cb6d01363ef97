"""Train a small text-to-image latent diffusion teacher from scratch (`fewstep train-teacher`).

Not a distillation method, but it runs through the same trainer, checkpoints and logging: phase
"vae" first trains the AutoencoderKL (reconstruction + KL), phase "unet" then trains the denoiser on
the frozen VAE's latents with the standard DDPM objective and caption dropout for classifier-free
guidance. The CLIP text encoder keeps its random initialisation and stays frozen: a fixed, distinct
embedding per prompt is all the cross-attention needs at this scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError, refuse_changed
from ..diffusion.sampling import make_scheduler, sample_images
from ..models.bundle import SDBundle, frozen_copy, weight_dtype_of
from ..training.ema import ema_update
from .base import Group, Method, StepOutput, register

# Architecture presets: (image size, VAE channels, UNet channels, text width, tokenizer words).
PRESETS = {
    # MNIST: 32 px → 8×8×4 latents; about 6 M parameters in all (≈ 12 MB in fp16).
    "mnist": dict(image_size=32, vae_channels=(32, 64, 64), unet_channels=(64, 128, 128), text_dim=64,
                  attention_head_dim=8, max_length=16),
    # Tests: the smallest model that still has every part.
    "tiny": dict(image_size=32, vae_channels=(32, 32, 64), unet_channels=(32, 64, 64), text_dim=32,
                 attention_head_dim=8, max_length=16),
}


@dataclass
class TeacherConfig:
    teacher_preset: str = "mnist"  # architecture preset: mnist or tiny
    prediction_type: str = "epsilon"  # epsilon or v_prediction
    vae_train_steps: int = 2000  # optimizer steps of the VAE phase (then the UNet phase)
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6  # weight of KL(q(z|x) ‖ N(0, I)); small, as in SD's VAE
    teacher_ema_decay: float = 0.999  # EMA of the UNet weights; the EMA is what gets exported (0: off)
    caption_dropout: float = 0.1  # probability of training on the empty prompt (enables CFG)
    teacher_guidance_scale: float = 4.0  # CFG scale recommended in the model card / `fewstep sample`
    teacher_inference_steps: int = 50  # DDIM steps recommended in the model card / `fewstep sample`

    def validate(self):
        if self.teacher_preset not in PRESETS:
            raise ConfigError(f"--teacher_preset must be one of {', '.join(PRESETS)}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError("--prediction_type must be epsilon or v_prediction")
        if self.vae_train_steps < 0:
            raise ConfigError("--vae_train_steps must be >= 0")
        if not 0 <= self.teacher_ema_decay < 1:
            raise ConfigError("--teacher_ema_decay must be in [0, 1)")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError("--caption_dropout must be in [0, 1)")
        if self.vae_train_steps == 0:
            refuse_changed(self, ("vae_learning_rate", "vae_kl_weight"), "with --vae_train_steps 0 (no VAE phase): "
                           "drop them")

    def validate_run(self, cfg):
        if self.vae_train_steps >= cfg.max_train_steps:
            raise ConfigError(f"--vae_train_steps {self.vae_train_steps} leaves no UNet steps in --max_train_steps "
                              f"{cfg.max_train_steps}: the UNet (and --learning_rate) would never train; raise "
                              "--max_train_steps")
        # A teacher is trained from scratch on pixels: the options of a given teacher and of latent data
        # do not apply.
        refuse_changed(cfg, ("pretrained_teacher_model", "teacher_revision", "pretrained_vae_model_name_or_path",
                             "cast_teacher_unet", "cache_dir"),
                       "for --method teacher, which trains its own VAE and UNet from scratch on images: drop them")
        refuse_changed(cfg, ("proportion_empty_prompts",), "for --method teacher: its caption dropout is "
                       "--caption_dropout (default 0.1); use that")
        refuse_changed(cfg, ("use_fix_crop_and_size",), "for --method teacher: its UNet takes no size or crop "
                       "conditioning (SD layout); drop it")
        refuse_changed(cfg, ("vae_encode_batch_size",), "for --method teacher: the whole batch is encoded as the VAE "
                       "trains on it; drop it")
        if not cfg.validation_steps:
            refuse_changed(cfg, ("validation_guidance_scale",), "with --validation_steps 0: drop it")

    def uses(self, cfg, bundle=None) -> dict:
        """The keys this run uses (config.used_settings)."""
        keys = ["teacher_preset", "prediction_type", "vae_train_steps", "teacher_ema_decay", "caption_dropout",
                "teacher_guidance_scale", "teacher_inference_steps", "learning_rate"]
        keys += ["vae_learning_rate", "vae_kl_weight"] if self.vae_train_steps > 0 else []
        keys += ["validation_guidance_scale"] if cfg.validation_steps else []
        return {k: getattr(self if hasattr(self, k) else cfg, k) for k in keys}


def build_new_bundle(mcfg: TeacherConfig, tokenizer_dir: Path, seed: int) -> SDBundle:
    """A fresh SD-layout model (random weights) from a preset."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..testing import DEFAULT_WORDS, write_clip_tokenizer

    p = PRESETS[mcfg.teacher_preset]
    write_clip_tokenizer(tokenizer_dir, DEFAULT_WORDS, p["max_length"])
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=p["text_dim"], intermediate_size=4 * p["text_dim"], num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=p["max_length"], projection_dim=p["text_dim"],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    n = len(p["vae_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(p["vae_channels"]),
                        latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=p["image_size"],
                        scaling_factor=1.0)
    uc = p["unet_channels"]
    unet = UNet2DConditionModel(
        sample_size=p["image_size"] // 2 ** (n - 1), in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(uc),
        down_block_types=("CrossAttnDownBlock2D",) * (len(uc) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(uc) - 1),
        cross_attention_dim=p["text_dim"], attention_head_dim=p["attention_head_dim"], norm_num_groups=16)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type=mcfg.prediction_type, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    for m in (te,):
        m.requires_grad_(False).eval()
    return SDBundle(str(tokenizer_dir), tok, te, vae, unet, dict(sched.config))


class VAEObjective(torch.nn.Module):
    """The VAE's training forward (encode → sample → decode), one module so DDP sees the whole graph."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        post = self.vae.encode(x).latent_dist
        return self.vae.decode(post.sample()).sample, post.kl()


class LatentScale(torch.nn.Module):
    """The VAE latent scaling factor, measured when the VAE phase ends; a buffer so it is checkpointed."""

    def __init__(self):
        super().__init__()
        self.register_buffer("value", torch.tensor(0.0))


@register
class Teacher(Method):
    name = "teacher"
    Config = TeacherConfig
    needs_teacher = False

    @classmethod
    def make_bundle(cls, cfg, mcfg):
        return build_new_bundle(mcfg, Path(cfg.output_dir) / "tokenizer", cfg.seed)

    def __init__(self, cfg, mcfg: TeacherConfig, bundle, accelerator):
        super().__init__(cfg, mcfg, bundle, accelerator)
        bundle.text_encoder.to(accelerator.device, weight_dtype_of(cfg.mixed_precision))
        bundle.schedule.to(accelerator.device)
        self.vae, self.unet = VAEObjective(bundle.vae.train()), bundle.unet.train()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.scale = LatentScale().to(accelerator.device)
        self.ema = frozen_copy(self.unet).to(accelerator.device) if mcfg.teacher_ema_decay > 0 else None

    def groups(self):
        return {"vae": Group(self.vae, lr=self.mcfg.vae_learning_rate), "unet": Group(self.unet)}

    def bind(self, prepared):
        super().bind(prepared)
        # The bundle must sample and encode with the trained (unwrapped) networks.
        self.bundle.vae = self.accelerator.unwrap_model(self.vae).vae
        self.bundle.unet = self.accelerator.unwrap_model(self.unet)

    def stateful(self):
        return {"latent_scale": self.scale, **({"unet_ema": self.ema} if self.ema is not None else {})}

    def after_step(self, phase, step):
        if phase == "unet" and self.ema is not None:
            ema_update(self.ema, self.accelerator.unwrap_model(self.unet), self.mcfg.teacher_ema_decay)

    def _denoiser(self):
        """The network to sample and export: the EMA when there is one."""
        return self.ema if self.ema is not None else self.bundle.unet

    def phase(self, step):
        return "vae" if step < self.mcfg.vae_train_steps else "unet"

    def loss(self, phase, batch, step):
        x = batch["pixel_values"].to(self.accelerator.device)
        if phase == "vae":
            rec, kl = self.vae(x)
            recon = F.mse_loss(rec.float(), x.float())
            kl = kl.mean() / x[0].numel()
            loss = recon + self.mcfg.vae_kl_weight * kl
            return StepOutput(loss, {"loss": loss.detach(), "vae/recon_mse": recon.detach(), "vae/kl": kl.detach()})
        if float(self.scale.value) == 0.0:
            self._measure_scale(x)
        sch = self.bundle.schedule
        with torch.no_grad():
            x0 = self.bundle.vae.encode(x.to(self.bundle.vae.dtype)).latent_dist.sample().float() * self.scale.value
        captions = list(batch["caption"])
        drop = torch.rand(len(captions)) < self.mcfg.caption_dropout
        cond = self.bundle.encode_text(["" if d else c for c, d in zip(captions, drop.tolist())])
        t = torch.randint(0, sch.num_train_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        z_t = sch.add_noise(x0, eps, t)
        out = self.bundle.predict(self.unet, z_t, t, cond)
        loss = F.mse_loss(out, sch.target(x0, eps, t))  # DDPM simple loss (Ho et al. 2020, eq. 14)
        return StepOutput(loss, {"loss": loss.detach()})

    @torch.no_grad()
    def _measure_scale(self, x):
        """1 / std of the latents, so the diffusion runs on unit-variance latents (SD's 0.18215 likewise)."""
        z = self.bundle.vae.encode(x.to(self.bundle.vae.dtype)).latent_dist.sample().float()
        std = self.accelerator.reduce(z.std().reshape(1), reduction="mean")
        self.scale.value.fill_(1.0 / float(std))
        self.bundle.vae.register_to_config(scaling_factor=float(self.scale.value))
        self.bundle.vae.eval().requires_grad_(False)

    def sample(self, prompts, seeds, num_inference_steps, guidance_scale):
        if float(self.scale.value) == 0.0:  # still in the VAE phase: show reconstructions' decoder
            n = len(prompts)
            return torch.zeros(n, 3, self.cfg.resolution, self.cfg.resolution)
        self.bundle.vae.register_to_config(scaling_factor=float(self.scale.value))
        sched = make_scheduler("ddim", self.bundle.scheduler_config)
        if guidance_scale is None:
            guidance_scale = self.mcfg.teacher_guidance_scale
        with self.accelerator.autocast():
            return sample_images(self.bundle, self._denoiser(), sched, prompts, seeds, num_inference_steps,
                                 guidance_scale, self.cfg.resolution, self.cfg.resolution)

    def export(self, out_dir: Path):
        from diffusers import DDIMScheduler

        from ..export import upcast_half_weights
        from ..testing import save_sd_pipeline

        self.bundle.vae.register_to_config(scaling_factor=float(self.scale.value))
        b = self.bundle
        parts = dict(tokenizer=b.tokenizer, text_encoder=b.text_encoder, vae=b.vae, unet=self._denoiser(),
                     scheduler=DDIMScheduler.from_config(b.scheduler_config))
        save_sd_pipeline(out_dir, parts)
        # The text encoder ran (frozen) in the mixed-precision dtype; stored in fp32 the folder loads in one
        # dtype in vanilla diffusers (see upcast_half_weights).
        upcast_half_weights(Path(out_dir) / "text_encoder")
        return {"scheduler": "DDIMScheduler", "num_inference_steps": self.mcfg.teacher_inference_steps,
                "valid_steps": (1, b.schedule.num_train_timesteps), "guidance_scale": self.mcfg.teacher_guidance_scale,
                "title": "Text-to-image teacher trained from scratch with fewstep",
                "guidance_note": "A teacher: sample it with many steps and classifier-free guidance."}
