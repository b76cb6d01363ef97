"""The one K-step sampler, with and without gradients, written to match the diffusers pipelines exactly.

:func:`unroll` runs any diffusers scheduler over any denoiser; validation grids, `fewstep sample`,
`fewstep eval`, `fewstep generate` (through :func:`sample_latents`) and direct distillation (with
gradients through every step) all go through it, and tests check that exported pipelines in vanilla
diffusers give the same images for the same seeds: the student is judged with the sampler users run.
"""

from __future__ import annotations

import inspect

import torch
import torch.utils.checkpoint

from ..config import ConfigError
from .guidance import cat_cond

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


def is_flow_config(scheduler_config: dict) -> bool:
    return str(scheduler_config.get("_class_name", "")).startswith("FlowMatch")


def make_scheduler(kind: str, scheduler_config: dict, **overrides):
    """A diffusers scheduler by short name, for the teacher's schedule kind.

    DDPM-table teachers: lcm, ddim (trailing spacing), ddim-leading (as SD ships it), dpm++ (DPM-Solver++
    2M), euler, ddpm. Flow-matching teachers: lcm (FlowMatchLCMScheduler: x̂₀ = z − σ v̂, then re-noised
    to the next σ), euler / ddim / flow-euler (FlowMatchEulerDiscreteScheduler; DDIM on the flow path is
    the Euler step), dpm++ (DPM-Solver++ 2M on flow sigmas). Overrides a class does not take are dropped
    (e.g. LCMScheduler's ``original_inference_steps`` for the flow LCM scheduler)."""
    import diffusers

    check_scheduler(kind, "scheduler")
    cfg_ = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if is_flow_config(scheduler_config):
        classes = {"lcm": diffusers.FlowMatchLCMScheduler, "ddim": diffusers.FlowMatchEulerDiscreteScheduler,
                   "euler": diffusers.FlowMatchEulerDiscreteScheduler,
                   "flow-euler": diffusers.FlowMatchEulerDiscreteScheduler,
                   "dpm++": diffusers.DPMSolverMultistepScheduler}
        if kind not in classes:
            raise ConfigError(f"scheduler {kind!r} samples DDPM-table teachers; this teacher is a flow-matching "
                              f"model: use one of {', '.join(classes)}")
        if kind == "dpm++":
            overrides = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_flow_sigmas": True,
                         "prediction_type": "flow_prediction", "flow_shift": cfg_.get("shift", 1.0), **overrides}
        if kind == "lcm":
            # A few-step student samples at exactly its grid, down to σ = 0 (x̂₀): the terminal stretch of
            # many-step sampling (Qwen-Image's shift_terminal 0.02) would move every σ of the grid, and
            # at one step divides by zero.
            overrides.setdefault("shift_terminal", None)
    else:
        classes = {
            "lcm": diffusers.LCMScheduler,
            "ddim": diffusers.DDIMScheduler,
            "ddim-leading": diffusers.DDIMScheduler,
            "dpm++": diffusers.DPMSolverMultistepScheduler,
            "euler": diffusers.EulerDiscreteScheduler,
            "ddpm": diffusers.DDPMScheduler,
        }
        if kind not in classes:
            raise ConfigError(f"scheduler {kind!r} samples flow-matching teachers; this teacher has a DDPM "
                              f"schedule: use one of {', '.join(classes)}")
        if kind == "dpm++":
            overrides.setdefault("algorithm_type", "dpmsolver++")
            overrides.setdefault("solver_order", 2)
        if kind == "ddim":
            # SD configs say "leading", whose first step at 4 steps is t=751, not 999: few-step sampling from
            # pure noise then starts from the wrong noise level. "trailing" is the fair few-step baseline.
            overrides.setdefault("timestep_spacing", "trailing")
        if kind == "ddim-leading":
            overrides.setdefault("timestep_spacing", "leading")
    cls = classes[kind]
    # Keys the class does not take (another class's config, e.g. FlowMatchEuler's stochastic_sampling for
    # FlowMatchLCM; LCM's original_inference_steps elsewhere) are dropped rather than warned about.
    accepted = inspect.signature(cls.__init__).parameters
    return cls.from_config({k: v for k, v in {**cfg_, **overrides}.items() if k in accepted})


def unroll(denoise, scheduler, x_T: torch.Tensor, num_inference_steps: int | None = None, checkpoint: bool = False,
           generator=None, timestep_kwargs: dict | None = None) -> list[torch.Tensor]:
    """States [z_0 = x_T·σ_init, z_1, …, z_K] of ``scheduler``'s K-step sampler.

    ``denoise(z, t)`` returns the (guided) model output; ``scheduler.step`` is the library's own code,
    so the states equal those of the vanilla pipeline. Differentiable when gradients are enabled; with
    ``checkpoint`` each denoiser call runs under ``torch.utils.checkpoint`` (only the K step inputs are
    kept). Only the denoiser call is checkpointed: the step itself is cheap, and some schedulers
    advance an internal counter on every call, which must not happen twice. ``timestep_kwargs`` go to
    ``set_timesteps`` (explicit timesteps or sigmas, a resolution-dependent ``mu``)."""
    kw = dict(timestep_kwargs or {})
    if "timesteps" in kw or "sigmas" in kw:
        scheduler.set_timesteps(device=x_T.device, **kw)
    else:
        scheduler.set_timesteps(num_inference_steps, device=x_T.device, **kw)
    # Flow-matching schedulers have no init_noise_sigma (their pipelines start from plain N(0, I)).
    z = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    states = [z]
    step_kw = {} if generator is None else {"generator": generator}
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(z, t) if hasattr(scheduler, "scale_model_input") else z
        if checkpoint and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(denoise, inp, t, use_reentrant=False)
        else:
            out = denoise(inp, t)
        z = scheduler.step(out, t, z, return_dict=True, **step_kw).prev_sample  # LCM: x̂₀ itself at the end
        states.append(z)
    return states


def guided_denoiser(bundle, net, cond, uncond, guidance_scale: float, w: torch.Tensor | None = None):
    """D(z, t) as a pipeline computes it: classifier-free guidance (the family's :meth:`~fewstep.models.base.
    ModelBundle.guide`) over one uncond ‖ cond batch, or two forwards where the family's pipeline runs
    two, when ``uncond`` is given (and the scale is > 1), else one conditional call (with the guidance
    weight ``w`` for students that embed it)."""
    if uncond is not None and guidance_scale > 1.0:
        if not bundle.cfg_batch:  # two forwards, as the family's pipeline runs them
            return lambda z, t: bundle.guide(bundle.denoise(net, z, t, cond), bundle.denoise(net, z, t, uncond),
                                             guidance_scale)
        both = cat_cond(uncond, cond)

        def denoise(z, t):
            out_u, out_c = bundle.denoise(net, torch.cat([z, z]), t, both).chunk(2)
            return bundle.guide(out_c, out_u, guidance_scale)

        return denoise
    return lambda z, t: bundle.denoise(net, z, t, cond, w)


@torch.no_grad()
def sample_latents(bundle, net, scheduler, prompts: list[str], seeds: list[int], num_inference_steps: int,
                   guidance_scale: float, height: int, width: int, noise: torch.Tensor | None = None,
                   timesteps: list | None = None) -> torch.Tensor:
    """Denoised latents for one image per (prompt, seed); classifier-free guidance as the pipeline does.
    ``timesteps``: explicit timesteps, as the pipeline's ``timesteps=`` (or, for flow teachers, its
    ``sigmas=``) argument, e.g. [399].

    ``noise``: the initial latents (B, C, h, w) to start from (as the pipeline's ``latents=`` argument),
    e.g. :func:`fewstep.diffusion.noise.batch_noise` of recorded (seed, rand_device) pairs; by default
    they are drawn from one CPU generator per seed.

    A denoiser that embeds the guidance scale (LCD students, guidance-distilled transformers) receives
    it (as :meth:`~fewstep.models.base.ModelBundle.guidance_input` says) and runs no CFG batch; otherwise
    CFG runs when guidance_scale > 1.
    """
    device = bundle.device
    dtype = next(net.parameters()).dtype
    n = len(prompts)
    cond = bundle.encode_text(prompts, size=(height, width))
    embeds = bundle.embeds_guidance(net)
    uncond = None if embeds or guidance_scale <= 1.0 else bundle.uncond(n, size=(height, width))
    w = torch.full((n,), bundle.guidance_input(guidance_scale), device=device) if embeds else None
    shape = (1, *bundle.latent_shape(height, width))
    # One generator per image, as the pipeline does with a list of generators.
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    if noise is None:
        latents = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)
    else:
        if tuple(noise.shape) != (n, *shape[1:]):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(n, *shape[1:])}")
        latents = noise.to(device, dtype)
    inner = guided_denoiser(bundle, net, cond, uncond, guidance_scale, w)

    # The scheduler steps in the pipeline's latent layout (FLUX: packed tokens), so that noise a step
    # draws lands where the pipeline's does; the denoiser sees (B, C, h, w) as everywhere else.
    def denoise(z, t):
        return bundle.pipeline_latents(inner(bundle.model_latents(z, height, width), t).to(dtype))

    kw = bundle.timestep_kwargs(height, width, timesteps, num_inference_steps=num_inference_steps,
                                scheduler=scheduler)
    step_gen = (gens if len(gens) > 1 else gens[0]) if bundle.step_generator else None
    states = unroll(denoise, scheduler, bundle.pipeline_latents(latents), num_inference_steps, generator=step_gen,
                    timestep_kwargs=kw)
    return bundle.model_latents(states[-1], height, width)


def sample_images(bundle, net, scheduler, prompts, seeds, num_inference_steps, guidance_scale, height, width,
                  timesteps=None):
    """Images in [0, 1], shape (n, 3, H, W)."""
    lat = sample_latents(bundle, net, scheduler, prompts, seeds, num_inference_steps, guidance_scale,
                         height, width, timesteps=timesteps)
    return bundle.decode(lat)
