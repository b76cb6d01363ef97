"""K-step sampling with any diffusers scheduler, written to match StableDiffusionPipeline exactly.

The validation grids, `fewstep sample` and the evaluation all go through :func:`sample_latents`, and a
test checks that the exported pipeline in vanilla diffusers gives the same images for the same
seeds: the student is judged with the sampler users will run.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from .schedule import guidance_scale_embedding

# Short names accepted by make_scheduler; checked by the commands before any model loads.
SCHEDULERS = ("lcm", "ddim", "ddim-leading", "dpm++", "euler", "ddpm", "flow-euler")


def check_scheduler(name: str, flag: str) -> str:
    """``name`` when it is a known short name, else a ConfigError naming ``flag`` and the choices."""
    if name not in SCHEDULERS:
        import difflib

        hint = difflib.get_close_matches(name, SCHEDULERS, n=1)
        raise ConfigError(f"{flag} {name!r}: unknown scheduler" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; choose from {', '.join(SCHEDULERS)}")
    return name


def make_scheduler(kind: str, scheduler_config: dict, **overrides):
    """A diffusers scheduler by short name: lcm, ddim (trailing spacing), ddim-leading (as SD ships it),
    dpm++ (DPM-Solver++ 2M), euler, ddpm, flow-euler (flow matching)."""
    import diffusers

    classes = {
        "lcm": diffusers.LCMScheduler,
        "ddim": diffusers.DDIMScheduler,
        "ddim-leading": diffusers.DDIMScheduler,
        "dpm++": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "ddpm": diffusers.DDPMScheduler,
        "flow-euler": diffusers.FlowMatchEulerDiscreteScheduler,  # flow-matching teachers (SD3)
    }
    check_scheduler(kind, "scheduler")
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if kind == "dpm++":
        overrides.setdefault("algorithm_type", "dpmsolver++")
        overrides.setdefault("solver_order", 2)
    if kind == "ddim":
        # SD configs say "leading", whose first step at 4 steps is t=751, not 999: few-step sampling from
        # pure noise then starts from the wrong noise level. "trailing" is the fair few-step baseline.
        overrides.setdefault("timestep_spacing", "trailing")
    if kind == "ddim-leading":
        overrides.setdefault("timestep_spacing", "leading")
    return classes[kind].from_config({**cfg, **overrides})


@torch.no_grad()
def sample_latents(bundle, unet, scheduler, prompts: list[str], seeds: list[int], num_inference_steps: int,
                   guidance_scale: float, height: int, width: int, noise: torch.Tensor | None = None,
                   timesteps: list[int] | None = None) -> torch.Tensor:
    """Denoised latents for one image per (prompt, seed); classifier-free guidance as the pipeline does.
    ``timesteps``: explicit timesteps, as the pipeline's ``timesteps=`` argument (e.g. [399]).

    ``noise``: the initial latents (B, C, h, w) to start from (as the pipeline's ``latents=`` argument),
    e.g. :func:`fewstep.diffusion.noise.batch_noise` of recorded (seed, rand_device) pairs; by default
    they are drawn from one CPU generator per seed.

    A UNet with a guidance embedding (``time_cond_proj_dim``) receives the embedding of
    guidance_scale − 1 and no CFG; otherwise CFG runs when guidance_scale > 1.
    """
    from ..models.bundle import cat_cond

    device = bundle.device
    dtype = next(unet.parameters()).dtype
    n = len(prompts)
    cond = bundle.encode_text(prompts, size=(height, width))
    w_dim = getattr(unet.config, "time_cond_proj_dim", None)  # transformers have none
    cfg = guidance_scale > 1.0 and w_dim is None
    if cfg:
        cond = cat_cond(bundle.uncond(n, size=(height, width)), cond)
    w_emb = None
    if w_dim is not None:
        w_emb = guidance_scale_embedding(torch.full((n,), guidance_scale - 1.0), w_dim).to(device, dtype)
    if timesteps is not None:
        scheduler.set_timesteps(device=device, timesteps=list(timesteps))
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    shape = (1, bundle.latent_channels, height // bundle.vae_scale, width // bundle.vae_scale)
    # One generator per image, as the pipeline does with a list of generators.
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    if noise is None:
        latents = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)
    else:
        if tuple(noise.shape) != (n, *shape[1:]):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(n, *shape[1:])}")
        latents = noise.to(device, dtype)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching: plain N(0, I)
    for t in scheduler.timesteps:
        inp = torch.cat([latents] * 2) if cfg else latents
        if hasattr(scheduler, "scale_model_input"):
            inp = scheduler.scale_model_input(inp, t)
        out = bundle.predict(unet, inp, t, cond, w_emb).to(dtype)
        if cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        step = scheduler.step(out, t, latents, generator=gens if len(gens) > 1 else gens[0], return_dict=True)
        latents = step.prev_sample  # LCMScheduler returns x̂₀ itself at the last step
    return latents


def sample_images(bundle, unet, scheduler, prompts, seeds, num_inference_steps, guidance_scale, height, width,
                  timesteps=None):
    """Images in [0, 1], shape (n, 3, H, W)."""
    lat = sample_latents(bundle, unet, scheduler, prompts, seeds, num_inference_steps, guidance_scale,
                         height, width, timesteps=timesteps)
    return bundle.decode(lat)
