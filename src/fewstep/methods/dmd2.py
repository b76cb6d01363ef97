"""DMD2: improved distribution matching distillation (arXiv 2405.14867), ALGORITHMS.md §5.

Three denoisers: the generator G (a copy of the teacher, trained), the real score (the frozen
teacher with classifier-free guidance at ``--real_guidance_scale``) and the fake score (initialised
from the teacher, trained to denoise G's own samples). G follows the difference of the two scores:
for x = G(z) noised to x_t at t ~ U[min_step, max_step],

    p_real = x − x̂₀_real(x_t),  p_fake = x − x̂₀_fake(x_t),
    g = (p_real − p_fake) / mean|p_real|   (per sample, non-finite values → 0),
    L_DM = ½ mean((x − stopgrad(x − g))²),

so ∂L_DM/∂x = g / numel(x). The fake score learns the ordinary denoising loss on detached G samples.

Two time scales as one phase schedule: per DMD2 iteration the reference updates G (every
``--dfake_gen_update_ratio``-th iteration) and then the fake score. Here an optimizer step updates one
group, so the flattened sequence is a cycle of r + 1 steps: G at position 0, the fake score at 1..r
(r fake-score updates per generator update, in the reference's order).

Learning-rate schedules follow the reference's iteration clock: DMD2 steps both groups' schedulers
once per iteration, whichever networks it updated, so here both advance one tick on every fake-score
step (each ends an iteration) and none on a generator step (:func:`iteration_of`); a schedule's length
is the run's number of iterations. The reference's schedulers, prepared by accelerate, step once per
process each iteration (its warmup lasts ``warmup_step`` / number of GPUs iterations, as its comment
says); here the warmup lasts ``--lr_warmup_steps`` iterations whatever the number of processes.

Memory-lean option: ``--fake_score_lora_rank`` makes the fake score a LoRA over the frozen teacher's
own weights; the real score is the same UNet with adapters disabled, so only two UNets sit in memory
(teacher + generator) instead of three.

Optional: a diffusion-GAN classifier head on the fake score's features (where the family's
:meth:`~fewstep.models.base.ModelBundle.feature_tap` reads them: a UNet's bottleneck, a transformer's
middle block) that tells re-noised real latents from re-noised G samples; and a regression loss of G on
teacher noise → image pairs (rows with ``seed`` and ``rand_device`` columns, as ``fewstep generate``
writes them).

Regression. The target is the teacher's own output for that noise: the row's saved latents
(``fewstep generate --save_latents``), else the VAE posterior mean of its image (a deterministic target,
as direct distillation uses; a posterior sample would add noise the generator cannot predict). The loss
is the latent MSE, or LPIPS between the decoded generator output and the teacher's image
(``--regression_loss lpips`` with local ``--lpips_weights``; :mod:`fewstep.eval.lpips`). DMD2 runs its
regression as a separate stage before distribution matching (``main/train_sd_ode.py``: ODE pretraining of G
on noise → image pairs with LPIPS in image space), then starts DMD2 from that generator; here
``--regression_only`` is that stage (G alone, the regression loss alone, no fake score built) and
``--generator_ckpt_path`` starts the next run's G from its output. fewstep also allows the regression
term inside a DMD2 run (``--regression_loss_weight`` without ``--regression_only``), as DMD (v1) did.

Flow-matching teachers run the same algorithm: timesteps are drawn as levels of the teacher's table
(:meth:`~fewstep.diffusion.schedule.Schedule.timestep`), x̂₀ comes from the predicted velocity, the fake
score learns the flow target ε − x₀, and a K-step generator is sampled by FlowMatchLCMScheduler (x̂₀,
then re-noised to the next σ: backward simulation's own step).

Where this differs from tianweiy/DMD2 (``main/``), deliberately: the two time scales are one cycle of
optimizer steps (same order and ratio; ``--max_train_steps`` counts steps, not iterations); the GAN's
real samples are the training batch's own images classified under the generated samples' captions and
SDXL time ids (DMD2 reads a separate real-image set; both give real and generated samples the same
fixed time ids); the regression term may also run inside a DMD2 run; the regression stage's LPIPS is
the ``lpips`` package's VGG on the teacher's own VAE (DMD2: ``piq``'s LPIPS on a tiny VAE decoder); the
fake score may be a LoRA over the teacher. Learning rates are recipe values, not family defaults.

Guidance-distilled teachers (``guidance_embedding == "native"``: FLUX.1-dev takes the CFG scale as an
input) run no cond ‖ uncond batch; all three networks are copies of that architecture and each gets a
fixed guidance input: the real score ``--real_guidance_scale`` (the guided teacher, as CFG at that scale
would give), the fake score ``--fake_guidance_scale`` when trained and when read (default 1: the
unguided conditional model, as DMD2's fake score runs without CFG), and the generator
``--real_guidance_scale``, the guidance it reproduces, so the exported student is sampled with
``guidance_scale`` = ``--real_guidance_scale`` (the pipeline passes it to that input). DisBack's path
points are read as the real score is.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError, micro_conditioning, refuse_changed, teacher_uses
from ..diffusion.noise import batch_noise
from ..diffusion.sampling import make_scheduler, sample_images
from ..diffusion.schedule import Prediction
from ..export import export_pipeline
from ..models.bundle import cat_cond, weight_dtype_of
from ..models.lora import adapter_params, adapters_disabled, attach_lora, save_lora
from .base import Group, Method, StepOutput, register


def dm_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor):
    """The distribution-matching loss and its (detached) direction g, ALGORITHMS.md §5.

    ``x`` carries the generator's graph; the score predictions are constants. Returns (L_DM, g).
    """
    with torch.no_grad():
        p_real = x.detach().double() - x0_real.double()
        p_fake = x.detach().double() - x0_fake.double()
        # Normalising by the real score's own error per sample makes the step size independent of the
        # noise level; a sample where p_real is 0 (or inf) would give NaN and is zeroed instead.
        norm = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        g = torch.nan_to_num((p_real - p_fake) / norm, nan=0.0, posinf=0.0, neginf=0.0).float()
    loss = 0.5 * F.mse_loss(x.float(), (x.detach().float() - g))
    return loss, g


def load_generator(net, path: str, denoiser_name: str) -> None:
    """Load G's starting weights strictly: a fewstep/diffusers output folder (its ``denoiser_name``
    subfolder, e.g. a ``--regression_only`` run's output), a denoiser folder, or a state-dict file
    (.safetensors, or a torch.save'd .bin/.pt such as DMD2's ``pytorch_model.bin``)."""
    p = Path(path)
    if p.is_dir():
        sub = p / denoiser_name if (p / denoiser_name / "config.json").is_file() else p
        if not (sub / "config.json").is_file():
            raise ConfigError(f"--generator_ckpt_path {path}: no {denoiser_name}/config.json in it; give an "
                              f"output folder, a {denoiser_name} folder, or a state-dict file (a "
                              "checkpoint's generator is checkpoint-N/model.safetensors)")
        sd = type(net).from_pretrained(str(sub), torch_dtype=torch.float32).state_dict()
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"--generator_ckpt_path {path} does not fit the teacher's {denoiser_name}: missing "
                          f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")


def _rounded(values: list) -> list:
    return [round(v, 6) if isinstance(v, float) else v for v in values]


def phase_of(step: int, ratio: int) -> str:
    """The two time-scale schedule: a cycle of ``ratio + 1`` steps, the generator at position 0."""
    return "generator" if step % (ratio + 1) == 0 else "guidance"


def iteration_of(step: int, ratio: int) -> int:
    """The reference iteration an optimizer step of the cycle belongs to. DMD2's iteration i updates G
    when i % ratio == 0, then the fake score once; the cycle of ratio + 1 steps is ratio iterations: the
    G step at position 0 and the first fake-score step share iteration c·ratio, position p ≥ 1 is
    iteration c·ratio + p − 1."""
    c, p = divmod(step, ratio + 1)
    return c * ratio + max(p - 1, 0)


def training_timesteps(num_train_timesteps: int, num_denoising_step: int, conditioning_timestep: int):
    """The generator's levels, largest first. One step: [conditioning_timestep]. K steps: the grid
    N−1, N−1−N/K, … (DMD2's ``range(N−1, 0, −N/K)``), which on a DDPM table is also what
    LCMScheduler(original_inference_steps=K) yields, so the exported scheduler samples at exactly these
    timesteps."""
    if num_denoising_step == 1:
        return [conditioning_timestep]
    k = num_train_timesteps // num_denoising_step
    return [num_train_timesteps - 1 - i * k for i in range(num_denoising_step)]


@dataclass
class DMD2Config:
    real_guidance_scale: float = 1.75  # CFG scale of the frozen real score (teacher): SD1.5 1.75, SDXL 8
    fake_guidance_scale: float = 1.0  # CFG scale of the fake score in the DM loss (1 = no CFG)
    dfake_gen_update_ratio: int = 10  # fake-score updates per generator update (SD1.5 10, SDXL 5)
    generator_lr: float | None = None  # generator learning rate (default: --learning_rate)
    guidance_lr: float | None = None  # fake score (and GAN head) learning rate (default: --learning_rate)
    min_step_percent: float = 0.02  # DM loss t ~ U[min, max] · num_train_timesteps
    max_step_percent: float = 0.98
    conditioning_timestep: int = 999  # timestep a one-step generator is told its noise input has (SDXL: 399)
    num_denoising_step: int = 1  # generator steps K (K > 1: timesteps N−1, N−1−N/K, …)
    backward_simulation: bool = False  # multi-step: make G's inputs by rolling G itself from noise
    dm_loss_weight: float = 1.0  # weight of the distribution-matching loss
    fake_score_lora_rank: int | None = None  # fake score as a LoRA of this rank over the teacher's weights
    fake_score_lora_alpha: float | None = None  # its LoRA α (default: rank)
    fake_score_lora_target_modules: list[str] | None = None  # default: the family's LoRA targets
    gen_cls_loss_weight: float | None = None  # generator GAN loss softplus(−D(fake)) weight (default 0; DMD2: 5e-3)
    guidance_cls_loss_weight: float | None = None  # discriminator loss weight (default 0; DMD2: 1e-2); needs real images
    cls_on_clean_image: bool = False  # DMD2's switch of the GAN head: the two weights above default to DMD2's
    gan_head: str = "dmd2"  # GAN head: dmd2 (strided 4×4 convs down to 1×1) or pooled (3×3 conv, average)
    diffusion_gan: bool = True  # re-noise GAN inputs at t ~ U[0, diffusion_gan_max_timestep)
    diffusion_gan_max_timestep: int = 1000
    regression_loss_weight: float = 0.0  # weight of G(noise) vs the teacher's output for that noise (seeds)
    regression_loss: str = "mse"  # mse (latents) or lpips (decoded images; needs --lpips_weights)
    lpips_weights: str | None = None  # local file: state_dict of lpips.LPIPS(net="vgg"), .pth or .safetensors
    regression_only: bool = False  # DMD2's ODE-pretraining stage: G on the regression loss alone, no fake net
    generator_ckpt_path: str | None = None  # start G from these weights: a fewstep output folder or a file


    def __post_init__(self):
        # Each weight not given: DMD2's SDXL value under --cls_on_clean_image, else 0 (no GAN term); so the
        # switch also completes a recipe that gives only one of them. With both given it changes nothing.
        self._cls_switch_unused = (self.cls_on_clean_image and self.gen_cls_loss_weight is not None
                                   and self.guidance_cls_loss_weight is not None)
        if self.gen_cls_loss_weight is None:
            self.gen_cls_loss_weight = 5e-3 if self.cls_on_clean_image else 0.0
        if self.guidance_cls_loss_weight is None:
            self.guidance_cls_loss_weight = 1e-2 if self.cls_on_clean_image else 0.0

    @property
    def gan(self) -> bool:
        return self.gen_cls_loss_weight > 0 or self.guidance_cls_loss_weight > 0

    def validate(self):
        if self.dfake_gen_update_ratio < 1:
            raise ConfigError("--dfake_gen_update_ratio must be >= 1")
        if not 0 <= self.min_step_percent < self.max_step_percent <= 1:
            raise ConfigError("need 0 <= --min_step_percent < --max_step_percent <= 1")
        if self.num_denoising_step < 1:
            raise ConfigError("--num_denoising_step must be >= 1")
        if self.num_denoising_step > 1 and self.conditioning_timestep != 999:
            raise ConfigError("--conditioning_timestep applies to one-step generators; with --num_denoising_step "
                              "> 1 the timesteps are N−1, N−1−N/K, …: drop --conditioning_timestep")
        if self.backward_simulation and self.num_denoising_step == 1:
            raise ConfigError("--backward_simulation needs a multi-step generator: set --num_denoising_step (e.g. 4)")
        for k in ("generator_lr", "guidance_lr"):
            if getattr(self, k) is not None and getattr(self, k) <= 0:
                raise ConfigError(f"--{k} must be > 0")
        if self.fake_score_lora_rank is not None and self.fake_score_lora_rank < 1:
            raise ConfigError("--fake_score_lora_rank must be >= 1")
        if min(self.gen_cls_loss_weight, self.guidance_cls_loss_weight, self.regression_loss_weight,
               self.dm_loss_weight) < 0:
            raise ConfigError("loss weights must be >= 0")
        if self.gan_head not in GAN_HEADS:
            raise ConfigError(f"--gan_head must be one of {', '.join(GAN_HEADS)}")
        if self.diffusion_gan_max_timestep < 1:
            raise ConfigError("--diffusion_gan_max_timestep must be >= 1")
        # options that would change nothing with these settings
        if getattr(self, "_cls_switch_unused", False):
            raise ConfigError("--cls_on_clean_image has no effect with both --gen_cls_loss_weight and "
                              "--guidance_cls_loss_weight given (they turn the GAN head on, with those weights): drop it")
        if self.fake_score_lora_rank is None:
            refuse_changed(self, ("fake_score_lora_alpha", "fake_score_lora_target_modules"), "without "
                           "--fake_score_lora_rank (they configure the LoRA fake score): add --fake_score_lora_rank R, "
                           "or drop them")
        if self.dm_loss_weight == 0:
            refuse_changed(self, ("real_guidance_scale", "fake_guidance_scale", "min_step_percent", "max_step_percent"),
                           "with --dm_loss_weight 0 (they configure the distribution-matching loss): drop them")
        if not self.gan:
            refuse_changed(self, ("gan_head", "diffusion_gan", "diffusion_gan_max_timestep"), "without the GAN head: set "
                           "--gen_cls_loss_weight / --guidance_cls_loss_weight (or --cls_on_clean_image), or drop them")
        elif not self.diffusion_gan:
            refuse_changed(self, ("diffusion_gan_max_timestep",), "with --diffusion_gan false: drop it")
        if self.regression_loss not in ("mse", "lpips"):
            raise ConfigError("--regression_loss must be mse or lpips")
        if self.regression_loss == "lpips" and not self.lpips_weights:
            raise ConfigError("--regression_loss lpips needs --lpips_weights: a local file with the "
                              "state_dict of lpips.LPIPS(net='vgg') (nothing is downloaded at run time)")
        if self.lpips_weights and self.regression_loss != "lpips":
            raise ConfigError("--lpips_weights is read by --regression_loss lpips only: add it, or drop "
                              "--lpips_weights")
        if self.lpips_weights and not Path(self.lpips_weights).is_file():
            raise ConfigError(f"--lpips_weights {self.lpips_weights}: no such file")
        if self.regression_only and self.regression_loss_weight <= 0:
            raise ConfigError("--regression_only trains the generator on the regression loss alone: give "
                              "--regression_loss_weight > 0 (e.g. 1)")
        if self.generator_ckpt_path and not Path(self.generator_ckpt_path).exists():
            raise ConfigError(f"--generator_ckpt_path {self.generator_ckpt_path}: no such file or folder")
        if self.regression_loss_weight == 0:
            refuse_changed(self, ("regression_loss",), "with --regression_loss_weight 0 (no regression loss): drop it")


    def encodes_images(self, cfg) -> bool:
        """Whether a step VAE-encodes data images: real latents for K-step inputs, the discriminator's
        real images, regression targets (a one-step generator alone needs the captions only)."""
        return not cfg.cache_dir and ((self.num_denoising_step > 1 and not self.backward_simulation)
                                      or self.guidance_cls_loss_weight > 0 or self.regression_loss_weight > 0)

    def validate_run(self, cfg):
        if self.generator_lr is not None and self.guidance_lr is not None:
            refuse_changed(cfg, ("learning_rate",), "with both --generator_lr and --guidance_lr given: drop it")
        if self.fake_score_lora_rank is not None and cfg.cast_teacher_unet:
            raise ConfigError("--cast_teacher_unet has no effect with --fake_score_lora_rank: the teacher's weights, "
                              "the fake score's base, are always held in the mixed-precision dtype; drop it")
        if self.guidance_cls_loss_weight == 0:
            refuse_changed(cfg, ("use_fix_crop_and_size",), "for this DMD2 run: the generator is conditioned on the "
                           "training resolution, only the discriminator's real images (--guidance_cls_loss_weight > "
                           "0) carry their own size and crop; drop it")
        if not self.encodes_images(cfg) and not cfg.cache_dir:
            refuse_changed(cfg, ("vae_encode_batch_size",), "for this DMD2 run, which encodes no image (a one-step "
                           "generator without the GAN's discriminator or the regression loss needs captions only)")
        if not cfg.validation_steps:
            refuse_changed(cfg, ("validation_guidance_scale",), "with --validation_steps 0: drop it")

    def uses(self, cfg, bundle=None) -> dict:
        """The keys this run uses (config.used_settings)."""
        keys = ["dfake_gen_update_ratio", "generator_lr", "guidance_lr", "num_denoising_step", "dm_loss_weight",
                "fake_score_lora_rank", "gen_cls_loss_weight", "guidance_cls_loss_weight", "regression_loss_weight",
                "proportion_empty_prompts"]  # (--cls_on_clean_image acts through the two weights)
        keys += ["conditioning_timestep"] if self.num_denoising_step == 1 else ["backward_simulation"]
        keys += (["real_guidance_scale", "fake_guidance_scale", "min_step_percent", "max_step_percent"]
                 if self.dm_loss_weight > 0 else [])
        keys += ["fake_score_lora_alpha", "fake_score_lora_target_modules"] if self.fake_score_lora_rank else []
        keys += ["cast_teacher_unet"] if self.fake_score_lora_rank is None else []
        keys += ["diffusion_gan", "gan_head"] if self.gan else []
        keys += ["regression_only", "generator_ckpt_path"]
        keys += ["regression_loss"] if self.regression_loss_weight > 0 else []
        keys += ["lpips_weights"] if self.regression_loss == "lpips" else []
        keys += ["diffusion_gan_max_timestep"] if self.gan and self.diffusion_gan else []
        keys += ["learning_rate"] if self.generator_lr is None or self.guidance_lr is None else []
        keys += ["vae_encode_batch_size"] if self.encodes_images(cfg) else []
        keys += ["validation_guidance_scale"] if cfg.validation_steps else []
        if self.guidance_cls_loss_weight > 0 and micro_conditioning(bundle) is not False:
            keys += ["use_fix_crop_and_size"]  # the discriminator's real images carry their size ids
        return {**teacher_uses(cfg), **{k: getattr(self if hasattr(self, k) else cfg, k) for k in keys}}


GAN_HEADS = ("dmd2", "pooled")


class ClassifierHead(torch.nn.Module):
    """The GAN discriminator's head on the fake score's features, a (B, C, h, w) map, to one realism
    logit per sample.

    ``dmd2`` (the default), DMD2's head: 4×4 convolutions of stride 2, each followed by GroupNorm and
    SiLU, halve the map while a side is longer than 4; one more convolution as large as what is left
    (DMD2's 4×4, stride 4) takes it to 1×1, again with GroupNorm and SiLU; a 1×1 convolution gives the
    logit. The depth follows the map's size, not the family: SD1.5's 8×8 bottleneck at 512 px gets one
    halving, SDXL's 32×32 at 1024 px three, exactly DMD2's two heads; a 2×2 UNet bottleneck or an SD3
    transformer's 4×4 patch grid none. ``pooled``, fewstep's earlier head: one 3×3 stride-2 conv,
    GroupNorm, SiLU, a global average and a 1×1 conv (any map size; checkpoints written before the
    DMD2 head hold this one)."""

    def __init__(self, channels: int, size: tuple[int, int], kind: str = "dmd2"):
        super().__init__()
        nn = torch.nn
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        self.kind, self.size = kind, tuple(size)

        def block(kernel, stride, padding):  # conv → GroupNorm → SiLU
            return [nn.Conv2d(channels, channels, kernel, stride=stride, padding=padding),
                    nn.GroupNorm(groups, channels), nn.SiLU()]

        if kind == "pooled":
            layers = block(3, 2, 1) + [nn.AdaptiveAvgPool2d(1)]
        else:
            layers = []
            h, w = self.size
            while max(h, w) > 4:
                # a side already at most 4 is kept (1-wide kernel along it) while the longer one is halved
                k = (4 if h > 4 else 1, 4 if w > 4 else 1)
                st = (2 if h > 4 else 1, 2 if w > 4 else 1)
                pad = (1 if h > 4 else 0, 1 if w > 4 else 0)
                layers += block(k, st, pad)
                h, w = (h + 2 * pad[0] - k[0]) // st[0] + 1, (w + 2 * pad[1] - k[1]) // st[1] + 1
            layers += block((h, w), (h, w), 0)
        self.net = nn.Sequential(*layers, nn.Conv2d(channels, 1, 1))

    def forward(self, feat):
        if self.kind == "dmd2" and tuple(feat.shape[-2:]) != self.size:
            raise ValueError(f"the GAN head was built for {self.size[0]}×{self.size[1]} features, got "
                             f"{tuple(feat.shape[-2:])}: train at the --resolution the head was made for")
        return self.net(feat.float()).flatten(1)[:, 0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint's head of another layout (the pooled head of runs before DMD2's head became the
        # default, or another map size) would fail deep inside the load with a shape list: say what to do.
        theirs = {k[len(prefix):]: tuple(v.shape) for k, v in state_dict.items() if k.startswith(prefix)}
        mine = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        if theirs and theirs != mine:
            pooled = theirs.get("net.0.weight", ())[-2:] == (3, 3) and "net.4.weight" in theirs
            if pooled:
                hint = "it holds the pooled head of earlier fewstep runs: resume with --gan_head pooled"
            else:
                hint = (f"it was written for another head or feature size (this run: --gan_head {self.kind}, "
                        f"{self.size[0]}×{self.size[1]} features): resume with the run's own --gan_head and "
                        "--resolution")
            raise ConfigError(f"the checkpoint's GAN head does not fit this run's: {hint}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FakeScore(torch.nn.Module):
    """The trainable "guidance" group: the fake-score denoiser and the optional GAN head, one module so
    that one optimizer (and accelerate's wrapping) covers both. ``forward`` is the denoiser's; inside
    :meth:`classifying` it returns the head's logits on the features ``tap`` reads during that same
    forward. (The denoiser's attribute is ``unet`` for every family: checkpoints store it by that name.)

    ``whole_backward`` (under --fsdp): the logits carry the denoiser's output with weight 0. The head reads
    a feature inside the denoiser, so its loss alone would not reach the denoiser's output, and a sharded
    network starts its backward there: gathering the parameters outside its blocks (the input layers,
    time embedding, a UNet's mid block) for the backward and reducing their gradients afterwards. With
    the output in the graph the backward is the network's usual one; its blocks after the tapped feature
    get exact zeros (the cost: their backward, only under --fsdp)."""

    def __init__(self, unet, head: ClassifierHead | None = None, tap=None, whole_backward: bool = False):
        super().__init__()
        self.unet = unet
        self.cls_head = head
        self.whole_backward = whole_backward
        self._feat = None
        self._classify = False
        if head is not None:
            tap.attach(self._hook)

    def _hook(self, feat):
        if self._classify:  # the same network also runs as the teacher (LoRA): keep only our own forwards
            self._feat = feat

    @contextlib.contextmanager
    def classifying(self):
        self._classify = True
        try:
            yield self
        finally:
            self._classify, self._feat = False, None

    def forward(self, *args, **kwargs):
        out = self.unet(*args, **kwargs)
        if not self._classify:
            return out
        logits = self.cls_head(self._feat)
        if self.whole_backward:
            logits = logits + 0.0 * (out if torch.is_tensor(out) else out[0]).sum()
        return _Logits((logits,))


class _Logits(tuple):
    """The head's output where the bundle expects the denoiser's output (``.sample``, or ``[0]``): built
    as ``_Logits((logits,))``, a plain tuple's constructor, because under mixed precision accelerate's
    fp32 output conversion rebuilds it as ``type(out)(converted elements)``."""

    @property
    def sample(self):
        return self[0]


@register
class DMD2(Method):
    name = "dmd2"
    Config = DMD2Config
    # (gan_head is not here: the head's load hook refuses the other head with the flag that fixes it)
    resume_keys = ("fake_score_lora_rank", "fake_score_lora_target_modules", "regression_only")

    @classmethod
    def memory_hints(cls, cfg, mcfg):
        on = " (already on)" if mcfg.fake_score_lora_rank is not None else ""
        return [f"--fake_score_lora_rank 64{on} (the fake score as a LoRA over the teacher: one UNet less)"]

    @classmethod
    def check_setup(cls, cfg, mcfg, bundle) -> None:
        if mcfg.regression_only and (mcfg.gan or mcfg.fake_score_lora_rank is not None):
            raise ConfigError("--regression_only trains the generator alone (no fake score, no GAN): drop "
                              "--cls_on_clean_image / --gen_cls_loss_weight / --guidance_cls_loss_weight / "
                              "--fake_score_lora_rank, or run them in the DMD2 stage that follows")
        if mcfg.lpips_weights:
            from ..eval.lpips import LPIPS

            LPIPS.from_file(mcfg.lpips_weights)  # another layout is refused before the teacher loads
        if mcfg.cls_on_clean_image and not mcfg.gan:
            raise ConfigError("--cls_on_clean_image turns the GAN head on, but --gen_cls_loss_weight and "
                              "--guidance_cls_loss_weight are both 0: give one > 0, or drop "
                              "--cls_on_clean_image")
        N = bundle.schedule.num_train_timesteps
        if mcfg.num_denoising_step > 1 and N % mcfg.num_denoising_step:
            raise ConfigError(f"--num_denoising_step {mcfg.num_denoising_step} must divide the teacher's {N} "
                              "training steps (1, 2, 4, 5, 8, 10 for N = 1000), so that the few-step scheduler "
                              "samples the generator at its training timesteps")
        if not 0 <= mcfg.conditioning_timestep < N:
            raise ConfigError(f"--conditioning_timestep must be in [0, {N})")
        if mcfg.regression_loss_weight > 0 and cfg.cache_dir:
            raise ConfigError("--regression_loss_weight regenerates each row's teacher noise from its seed and "
                              "rand_device columns, which a `fewstep cache` does not keep: train from the "
                              "metadata CSV (--train_data_dir meta.csv), not --cache_dir")

    def __init__(self, cfg, mcfg: DMD2Config, bundle, accelerator):
        super().__init__(cfg, mcfg, bundle, accelerator)
        self.check_setup(cfg, mcfg, bundle)
        res = cfg.resolution
        self.schedule = sch = bundle.schedule_for(res, res)
        N = self.N = sch.num_train_timesteps
        self.timesteps = self._grid(mcfg.num_denoising_step, mcfg.conditioning_timestep)
        self.min_step = int(mcfg.min_step_percent * N)
        self.max_step = min(int(mcfg.max_step_percent * N), N - 1)
        self.t_noise = sch.timestep(torch.tensor(N - 1)).item()  # the pure-noise end of the table
        wdt = weight_dtype_of(cfg.mixed_precision)
        dev = accelerator.device
        self.lora = mcfg.fake_score_lora_rank is not None
        self.native = bundle.guidance_embedding == "native"
        # Trainable copies first, from the fp32 teacher weights, before the teacher is cast.
        self.generator = bundle.new_denoiser()
        if mcfg.generator_ckpt_path:
            load_generator(self.generator, mcfg.generator_ckpt_path, bundle.denoiser_name)
        # The regression stage trains G alone: no fake score is built.
        fake_net = None if (self.lora or mcfg.regression_only) else bundle.new_denoiser()
        # The frozen teacher (real score) in the mixed-precision dtype; with a LoRA fake score its base
        # weights are the fake score's too and are frozen, so they go to that dtype as well.
        bundle.to(dev, dtype=wdt, denoiser_dtype=wdt if (cfg.cast_teacher_unet or self.lora) else torch.float32)
        if self.lora:
            r = mcfg.fake_score_lora_rank
            attach_lora(bundle.denoiser, r, mcfg.fake_score_lora_alpha or r, 0.0,
                        mcfg.fake_score_lora_target_modules or bundle.lora_targets,
                        flag="--fake_score_lora_target_modules")
            fake_net = bundle.denoiser
        head = tap = None
        if mcfg.gan:
            tap = bundle.feature_tap(fake_net)
            head = ClassifierHead(tap.channels, tap.size(*self._latent_shape(1)[-2:]), mcfg.gan_head)
        self.guidance = None if mcfg.regression_only else FakeScore(fake_net, head, tap, whole_backward=cfg.fsdp).to(dev)
        self.generator.to(dev)
        self.lpips = None
        if mcfg.regression_loss == "lpips":
            from ..eval.lpips import LPIPS

            self.lpips = LPIPS.from_file(mcfg.lpips_weights).to(dev)
        if cfg.gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
            if fake_net is not None and not self.lora:
                fake_net.enable_gradient_checkpointing()

    # ---- groups and schedule ---------------------------------------------------------------
    def groups(self):
        m = self.mcfg
        gen = {"generator": Group(self.generator, lr=m.generator_lr,
                                  params=list(self.generator.parameters()))}
        if m.regression_only:
            return gen
        if self.lora:
            fake = [p for _, p in adapter_params(self._fake_unet(), "default")]
        else:
            fake = list(self._fake_unet().parameters())
        head = self._guidance().cls_head
        if head is not None:
            fake += list(head.parameters())
        return {**gen, "guidance": Group(self.guidance, lr=m.guidance_lr, params=fake)}

    def phase(self, step):
        if self.mcfg.regression_only:
            return "generator"
        return phase_of(step, self.mcfg.dfake_gen_update_ratio)

    def schedule_ticks(self, phase, step):
        # An iteration ends with its fake-score update: both schedules advance then (see the module doc).
        return {} if phase == "generator" else {"generator": 1, "guidance": 1}

    def schedule_length(self, group):
        return iteration_of(self.cfg.max_train_steps - 1, self.mcfg.dfake_gen_update_ratio) + 1

    # ---- networks --------------------------------------------------------------------------
    def _guidance(self) -> FakeScore:
        return self.accelerator.unwrap_model(self.guidance)

    def _fake_unet(self):
        return self._guidance().unet

    def _gen(self):
        return self.accelerator.unwrap_model(self.generator)

    def _grid(self, K: int, conditioning_level: int) -> list:
        """The generator's training timesteps: the table timesteps of :func:`training_timesteps`'s levels
        (ints on DDPM tables, floats on the flow table)."""
        levels = torch.tensor(training_timesteps(self.N, K, conditioning_level))
        return self.schedule.timestep(levels).tolist()

    def real_score(self, z, t, cond, w=None):
        """Raw output of the real score: the teacher (the shared network with adapters off, for LoRA);
        ``w``: the guidance input of a guidance-distilled teacher."""
        if self.lora:
            with adapters_disabled(self.bundle.denoiser) as base:
                return self.bundle.denoise(base, z, t, cond, w)
        return self.bundle.denoise(self.bundle.denoiser, z, t, cond, w)

    def fake_score(self, z, t, cond, net=None):
        return self.bundle.denoise(net if net is not None else self._guidance(), z, t, cond, self._g_fake(z))

    def _g(self, scale, z):
        """The guidance input at CFG scale ``scale`` for a batch like ``z``, for guidance-distilled
        architectures (None otherwise: they run CFG over a batch instead)."""
        if not self.native:
            return None
        return torch.full((z.shape[0],), self.bundle.guidance_input(scale), device=z.device)

    def _g_fake(self, z):
        return self._g(self.mcfg.fake_guidance_scale, z)

    def _g_gen(self, z):
        return self._g(self.mcfg.real_guidance_scale, z)

    def _guided_x0(self, score, z, t, cond, scale):
        """x̂₀ under classifier-free guidance x̂₀_u + s (x̂₀_c − x̂₀_u), as the family's pipeline guides
        (:meth:`~fewstep.models.base.ModelBundle.guide_prediction`): cond and uncond in one batch (a
        guidance-distilled architecture reads it at guidance input s instead)."""
        sch, B = self.schedule, z.shape[0]
        if self.native:
            return sch.to_x0_eps(score(z, t, cond, self._g(scale, z)), z, t)[0]
        if scale == 1.0:
            return sch.to_x0_eps(score(z, t, cond), z, t)[0]
        zz, tt = torch.cat([z, z]), torch.cat([t, t])
        uncond = self.bundle.uncond(B, size=self._size(), like=cond)
        both = sch.predict(score(zz, tt, cat_cond(cond, uncond)), zz, tt)
        c, u = (Prediction(*parts) for parts in zip(both.x0.chunk(2), both.eps.chunk(2), both.raw.chunk(2)))
        return self.bundle.guide_prediction(c, u, z, t, scale, schedule=sch).x0

    def _size(self):
        return (self.cfg.resolution, self.cfg.resolution)

    def _latent_shape(self, B):
        return (B, *self.bundle.latent_shape(*self._size()))

    def _cond(self, batch):
        # (from a cache, the stored text embeddings: no text encoder in the step; the size-only
        # micro-conditioning of SDXL, as the generator is trained at one resolution)
        text = self.bundle.batch_text(batch, self.cfg.proportion_empty_prompts)
        return self.bundle.cond_from_text(text, self._size())

    def _generate_x0(self, gen, z, t, cond):
        return self.bundle.predict(gen, z, t, cond, self._g_gen(z), schedule=self.schedule).x0

    def generator_input(self, batch, cond, B):
        """(z, t) the generator is trained on, ALGORITHMS.md §5: one step, pure noise at the conditioning
        timestep; K steps, a training timestep t_k with z = real latents noised to t_k, or, with backward
        simulation, G's own k-step roll-out from noise re-noised to t_k. Pure noise at the table's noisiest
        level."""
        dev, sch = self.accelerator.device, self.schedule
        noise = torch.randn(self._latent_shape(B), device=dev)
        ts = torch.tensor(self.timesteps, device=dev)
        if len(self.timesteps) == 1:
            return noise, ts[[0] * B]
        if self.mcfg.backward_simulation:
            k = int(torch.randint(0, len(self.timesteps), (1,)))  # one roll-out length for the batch
            z, gen = torch.randn_like(noise), self._gen()
            x0 = None
            with torch.no_grad():
                for j in range(k):
                    x0 = self._generate_x0(gen, z, ts[[j] * B], cond)
                    z = sch.add_noise(x0, torch.randn_like(x0), ts[[j + 1] * B])
            t = ts[[k] * B]
            clean = x0 if x0 is not None else noise
        else:
            t = ts[torch.randint(0, len(self.timesteps), (B,), device=dev)]
            clean = self.bundle.batch_latents(batch)
        z = sch.add_noise(clean, noise, t)
        pure = t == self.t_noise
        z[pure] = noise[pure]
        return z, t

    # ---- losses ----------------------------------------------------------------------------
    def loss(self, phase, batch, step):
        B = len(batch["caption"])
        cond = self._cond(batch)
        if phase == "generator":
            return self.generator_loss(batch, cond, B)
        return self.guidance_loss(batch, cond, B)

    def _real_x0(self, x_t, t, cond):
        return self._guided_x0(self.real_score, x_t, t, cond, self.mcfg.real_guidance_scale)

    def generator_loss(self, batch, cond, B):
        m, sch, dev = self.mcfg, self.schedule, self.accelerator.device
        if m.regression_only:  # the regression stage: no generated batch, no score, no GAN
            l_reg = self.regression_loss(batch, cond)
            loss = m.regression_loss_weight * l_reg
            return StepOutput(loss, {"loss_regression": l_reg.detach(), "loss": loss.detach()})
        z, t_g = self.generator_input(batch, cond, B)
        x = self._generate_x0(self.generator, z, t_g, cond)
        logs = {}
        loss = x.new_zeros(())
        if m.dm_loss_weight > 0:
            t = sch.timestep(torch.randint(self.min_step, self.max_step + 1, (B,), device=dev))
            x_t = sch.add_noise(x.detach(), torch.randn_like(x), t)
            with torch.no_grad():
                fake = self._guidance()
                x0_fake = self._guided_x0(lambda a, b, c, w=None: self.bundle.denoise(fake, a, b, c, w), x_t, t,
                                          cond, m.fake_guidance_scale)
                x0_real = self._real_x0(x_t, t, cond)
            l_dm, g = dm_loss(x, x0_real, x0_fake)
            loss = loss + m.dm_loss_weight * l_dm
            logs["loss_dm"] = l_dm.detach()
            logs["dm_grad_norm"] = g.norm().detach()
        if m.gen_cls_loss_weight > 0:
            logits = self._logits(self._guidance(), x, cond)
            l_cls = F.softplus(-logits).mean()
            loss = loss + m.gen_cls_loss_weight * l_cls
            logs["gen_cls_loss"] = l_cls.detach()
        if m.regression_loss_weight > 0:
            l_reg = self.regression_loss(batch, cond)
            loss = loss + m.regression_loss_weight * l_reg
            logs["loss_regression"] = l_reg.detach()
        logs["loss"] = loss.detach()
        return StepOutput(loss, logs)

    def regression_loss(self, batch, cond):
        """G at its first timestep on the recorded teacher noise vs the teacher's output for that noise:
        latent MSE, or LPIPS of the decoded output against the teacher's image."""
        meta = batch.get("meta") or {}
        if "seed" not in meta or "rand_device" not in meta:
            raise ConfigError("--regression_loss_weight needs teacher noise → image pairs: data rows with seed and "
                              "rand_device columns (write them with `fewstep generate`)")
        if self.cfg.proportion_empty_prompts > 0:
            # a pair is (prompt, noise) → image: its target is the prompt's, so the prompt is never dropped
            cond = self.bundle.cond_from_text(self.bundle.batch_text(batch), self._size())
        shape = self._latent_shape(1)[1:]
        noise = batch_noise([int(s) for s in meta["seed"]], meta["rand_device"], shape, device=self.accelerator.device)
        t = torch.tensor([self.timesteps[0]] * noise.shape[0], device=noise.device)
        x = self._generate_x0(self.generator, noise, t, cond)
        saved = self._saved_latents(meta, shape)
        if self.lpips is None:
            with torch.no_grad():
                target = saved if saved is not None else self.bundle.batch_latents(batch, sample=False)
            return F.mse_loss(x.float(), target.float())
        with torch.no_grad():
            image = (self.bundle.decode_pixels(saved) if saved is not None else
                     batch["pixel_values"].to(x.device, torch.float32))
        return self.lpips(self.bundle.decode_pixels(x), image).mean()

    def _saved_latents(self, meta, shape) -> torch.Tensor | None:
        """The teacher's final latents of each row (``fewstep generate --save_latents``), or None."""
        paths = meta.get("latents")
        if not paths or not all(paths):
            return None
        from safetensors.torch import load_file

        src = Path(self.cfg.train_data_dir)
        root = src if src.is_dir() else src.parent
        lat = torch.stack([load_file(str(root / p))["latents"] for p in paths]).to(self.accelerator.device)
        if tuple(lat.shape[1:]) != tuple(shape):
            raise ConfigError(f"the rows' saved latents have shape {tuple(lat.shape[1:])}, but --resolution "
                              f"{self.cfg.resolution} gives {tuple(shape)}: train at the data's resolution")
        return lat.float()

    def _logits(self, net, x, cond):
        """D(x): the head on the fake score's bottleneck, x re-noised first (diffusion GAN)."""
        B, sch = x.shape[0], self.schedule
        if self.mcfg.diffusion_gan:
            t = sch.timestep(torch.randint(0, min(self.mcfg.diffusion_gan_max_timestep, self.N), (B,), device=x.device))
            x = sch.add_noise(x, torch.randn_like(x), t)
        else:
            t = sch.timestep(torch.full((B,), -1, device=x.device))  # the clean end (t = 0)

        with self._guidance().classifying():
            return self.bundle.denoise(net, x, t, cond, self._g_fake(x))

    @torch.no_grad()
    def generate(self, batch, cond, B):
        """Detached generator samples, made exactly as in the generator phase."""
        z, t = self.generator_input(batch, cond, B)
        return self._generate_x0(self._gen(), z, t, cond)

    def guidance_loss(self, batch, cond, B, gan: bool = True):
        """The fake score's denoising loss on detached generator samples (+ the discriminator loss)."""
        m, sch, dev = self.mcfg, self.schedule, self.accelerator.device
        x = self.generate(batch, cond, B)
        t = sch.timestep(torch.randint(0, self.N, (B,), device=dev))
        eps = torch.randn_like(x)
        x_t = sch.add_noise(x, eps, t)
        out = self.fake_score(x_t, t, cond, self.guidance)
        loss = F.mse_loss(out.float(), sch.target(x, eps, t).float())
        logs = {"loss_fake": loss.detach()}
        if gan and m.guidance_cls_loss_weight > 0:
            # The data's latents under the generated samples' own condition: the same captions and, where
            # the family has micro-conditioning, the same fixed (res, res, 0, 0, res, res) time ids, as
            # DMD2 gives its real images; with each image's own original size and crop the discriminator
            # could tell real from generated by the conditioning alone.
            real = self.bundle.batch_latents(batch)
            d_fake = self._logits(self.guidance, x, cond)
            d_real = self._logits(self.guidance, real, cond)
            l_cls = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
            loss = loss + m.guidance_cls_loss_weight * l_cls
            logs["guidance_cls_loss"] = l_cls.detach()
            logs["d_real"] = torch.sigmoid(d_real).mean().detach()
            logs["d_fake"] = torch.sigmoid(d_fake).mean().detach()
        logs["loss"] = loss.detach()
        return StepOutput(loss, logs)

    # ---- sampling and export -------------------------------------------------------------
    def scheduler(self, num_inference_steps: int | None = None):
        """The family's LCM scheduler (LCMScheduler / FlowMatchLCMScheduler: x̂₀, then re-noised), whose
        default grid for K steps is the generator's training timesteps on DDPM tables."""
        k = max(self.mcfg.num_denoising_step, num_inference_steps or 1)
        return make_scheduler("lcm", self.bundle.scheduler_config, original_inference_steps=k)

    def sampling_timesteps(self, num_inference_steps: int) -> list | None:
        """Explicit timesteps where the scheduler's own grid differs from the training timesteps (a
        one-step generator conditioned on t ≠ the noisiest, e.g. [399]; the flow LCM scheduler's
        K-step grid)."""
        if num_inference_steps != len(self.timesteps):
            return None
        sched = self.scheduler(num_inference_steps)
        res = self.cfg.resolution
        # (the grid the family's pipeline would sample: FLUX and Qwen-Image pass their own sigmas)
        sched.set_timesteps(num_inference_steps, **self.bundle.timestep_kwargs(
            res, res, num_inference_steps=num_inference_steps, scheduler=sched))
        own = sched.timesteps.tolist()
        if all(abs(a - b) < 1e-3 for a, b in zip(own, self.timesteps)):
            return None
        return list(self.timesteps)

    def trained_steps(self):
        # LCMScheduler(original_inference_steps=K) runs n <= K steps on a subset of the K training timesteps
        # (and raises for more); a one-step generator runs one step only.
        return (1, self.mcfg.num_denoising_step)

    def sample(self, prompts, seeds, num_inference_steps, guidance_scale):
        res = self.cfg.resolution
        with self.accelerator.autocast():
            return sample_images(self.bundle, self._gen(), self.scheduler(num_inference_steps),
                                 prompts, seeds, num_inference_steps, guidance_scale or self.default_guidance(),
                                 res, res, timesteps=self.sampling_timesteps(num_inference_steps))

    def default_guidance(self) -> float:
        # CFG is distilled in: no CFG batch (0). A guidance-distilled generator keeps its guidance input at
        # the scale it was trained with.
        return self.mcfg.real_guidance_scale if self.native else 0.0

    def export(self, out_dir: Path):
        K = self.mcfg.num_denoising_step
        export_pipeline(self.bundle, self._gen(), self.scheduler(), out_dir,
                        vae_override=self.cfg.pretrained_vae_model_name_or_path)
        name = type(self.scheduler()).__name__
        grid = (f"Trained at timesteps {_rounded(self.timesteps)}"
                + (f" (fewer steps sample the scheduler's own grid for that count; {name} "
                   f"is not trained for more than {K})" if K > 1 else ""))
        facts = {"scheduler": name, "num_inference_steps": K, "valid_steps": self.trained_steps(),
                 "guidance_scale": 0.0,
                 "guidance_note": grid + "; guidance is distilled in, sample with guidance_scale 0 (no CFG batch)."}
        if self.native:
            g = self.mcfg.real_guidance_scale
            facts["guidance_scale"] = g
            facts["guidance_note"] = (f"{grid}. The generator keeps the transformer's guidance input and was "
                                      f"trained with it at {g:g} (the teacher's guidance it reproduces): sample "
                                      f"with guidance_scale {g:g}, which the pipeline passes to that input (no "
                                      "CFG batch).")
        ts = self.sampling_timesteps(K)
        if ts:
            res = self.cfg.resolution
            facts["timesteps"] = ts
            facts["timestep_kwargs"] = {k: v for k, v in self.bundle.timestep_kwargs(res, res, ts).items() if k != "mu"}
            arg = ", ".join(f"{k}={_rounded(v)}" for k, v in facts["timestep_kwargs"].items())
            facts["guidance_note"] += f" Pass {arg} to the pipeline ({name}'s own grid differs)."
        if self.lora:
            # The trained fake score is a by-product users rarely need; keep it small and loadable.
            save_lora(self.bundle.denoiser, Path(out_dir) / "fake_score_lora", self.bundle, self.bundle.root)
        (Path(out_dir) / "fewstep_dmd2.json").write_text(json.dumps({"timesteps": self.timesteps}) + "\n")
        return facts

