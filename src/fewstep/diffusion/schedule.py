"""Pure diffusion math: noise schedules, prediction-type conversions, consistency scalings.

One picture covers every teacher fewstep distils: a noisy latent is z_t = α(t) x₀ + σ(t) ε, where t is
the denoiser's own timestep input. Two schedules give α and σ:

- :class:`DDPMSchedule`, the discrete table of ε/v/x₀ UNets (SD1.x/2.x, SDXL): t ∈ {0 … N−1},
  α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t); between table entries ᾱ is interpolated linearly, so α, σ and their
  derivatives exist for any real t ∈ [0, N − 1].
- :class:`FlowSchedule`, rectified flow (SD3, FLUX, Qwen-Image): t = N·σ, α = 1 − σ, the network
  predicts the velocity v = ε − x₀ (Liu et al. 2022; Esser et al. 2024, eq. 2-3).

Methods draw *levels* i ∈ {0 … N−1} (noisiest last), as the DDPM-era algorithms are written, and ask
:meth:`Schedule.timestep` for the timestep of level i: the identity on the DDPM table, N·σ_i on the
flow table σ_i = shift(i + 1) / N) that diffusers' FlowMatchEulerDiscreteScheduler trains on. Level −1
is the clean end: t = 0 (the DDPM table's first entry, as the LCM reference clamps to it; σ = 0 for
flow). With this, every method's sampling of timesteps reads the same for both kinds.

Every function here works on tensors only; nothing knows about model classes. Symbols follow the
papers: ᾱ_t is ``alphas_cumprod[t]``, x̂₀ the predicted clean latent, ε̂ the predicted noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


@dataclass
class Prediction:
    """A denoiser's output at (z_t, t) in every parameterisation a method may need."""

    x0: torch.Tensor  # x̂₀
    eps: torch.Tensor  # ε̂
    raw: torch.Tensor  # what the network returned (ε, v, x₀ or the flow velocity)

    @property
    def velocity(self) -> torch.Tensor:
        """The flow velocity ε̂ − x̂₀ (dz/dσ of the straight path through x̂₀ and ε̂)."""
        return self.eps - self.x0


class Schedule:
    """α(t), σ(t) of z_t = α(t) x₀ + σ(t) ε as functions of the denoiser's timestep input t."""

    kind: str = ""

    def __init__(self, prediction_type: str, num_train_timesteps: int):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(num_train_timesteps)

    # ---- the two functions every schedule defines ----------------------------------------------
    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α(t) and σ(t) broadcast to the shape (and dtype) of ``like``."""
        raise NotImplementedError

    def derivatives(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dα/dt and dσ/dt broadcast like :meth:`alpha_sigma` (for continuous-time methods)."""
        raise NotImplementedError

    def timestep(self, level: torch.Tensor) -> torch.Tensor:
        """The timestep of training level ``level`` ∈ {−1 … N−1}; −1 is the clean end (t = 0)."""
        raise NotImplementedError

    def to(self, device) -> Schedule:
        return self

    # ---- everything else follows from α and σ --------------------------------------------------
    @staticmethod
    def _shape(like: torch.Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (like.ndim - 1)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = α_t x₀ + σ_t ε (the forward process; DDPM eq. 4, rectified flow's straight path)."""
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * eps

    def to_x0_eps(self, model_output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor):
        """(x̂₀, ε̂) from a model output of this schedule's prediction type."""
        a, s = self.alpha_sigma(t, z_t)
        return x0_eps_from_output(model_output, z_t, a, s, self.prediction_type)

    def predict(self, model_output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        x0, eps = self.to_x0_eps(model_output, z_t, t)
        return Prediction(x0, eps, model_output)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a model of this prediction type is trained to output."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        if self.prediction_type == "flow":
            return eps - x0  # v = dz/dσ on the straight path
        a, s = self.alpha_sigma(t, x0)
        return a * eps - s * x0  # v = α ε − σ x₀ (Salimans & Ho 2022, §4)

    def step(self, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """One deterministic solver step to timestep ``s`` from (x̂₀, ε̂) predicted at the current one:
        DDIM with η = 0 for DDPM tables, which on the flow path is exactly the Euler step
        z_s = z_t + (σ_s − σ_t) v̂, since both equal α_s x̂₀ + σ_s ε̂."""
        a, sig = self.alpha_sigma(s, x0)
        return ddim_step(x0, eps, a, sig)

    def consistency_scalings(self, t: torch.Tensor, timestep_scaling: float = 10.0):
        """c_skip(t), c_out(t) of the consistency function f = c_skip z_t + c_out x̂₀, which must satisfy
        f(z, t_min) = z at the clean end of the solver grid."""
        raise NotImplementedError


class DDPMSchedule(Schedule):
    """The discrete DDPM schedule of a teacher (N training steps), as α_t and σ_t lookup tables."""

    kind = "ddpm"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type == "flow":
            raise ValueError("a DDPM table has no flow parameterisation; use FlowSchedule")
        super().__init__(prediction_type, len(alphas_cumprod))
        self.alphas_cumprod = alphas_cumprod.double()
        self.alpha = self.alphas_cumprod.sqrt().float()  # α_t
        self.sigma = (1.0 - self.alphas_cumprod).sqrt().float()  # σ_t
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_scheduler_config(cls, config) -> DDPMSchedule:
        """Build from a diffusers scheduler config (any of the DDPM-family schedulers)."""
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(config)
        return cls(sched.alphas_cumprod, sched.config.prediction_type)

    def to(self, device) -> DDPMSchedule:
        self.alpha = self.alpha.to(device)
        self.sigma = self.sigma.to(device)
        self._copies = {}
        return self

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """α and σ on ``device``, copied once: a copy from host memory per call would make the host
        wait for the GPU to finish its queue several times per training step."""
        if self.alpha.device == device:
            return self.alpha, self.sigma
        if device not in self._copies:
            self._copies[device] = (self.alpha.to(device), self.sigma.to(device))
        return self._copies[device]

    def _acp(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ᾱ(t) and dᾱ/dt for real t, linear between table entries (float64)."""
        acp = self.alphas_cumprod.to(t.device)
        t = t.double().clamp(0, self.num_train_timesteps - 1)
        i0 = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        slope = acp[i0 + 1] - acp[i0]
        return acp[i0] + (t - i0) * slope, slope

    def alpha_sigma(self, t, like):
        shape = self._shape(like)
        t = torch.as_tensor(t, device=like.device)
        if not torch.is_floating_point(t):  # table entries: exactly the values diffusers uses
            alpha, sigma = self._tables(like.device)
            return alpha[t].reshape(shape).to(like.dtype), sigma[t].reshape(shape).to(like.dtype)
        acp, _ = self._acp(t)
        return acp.sqrt().reshape(shape).to(like.dtype), (1 - acp).sqrt().reshape(shape).to(like.dtype)

    def derivatives(self, t, like):
        shape = self._shape(like)
        acp, slope = self._acp(torch.as_tensor(t, device=like.device))
        d_alpha = slope / (2 * acp.sqrt())  # d√ᾱ/dt
        d_sigma = -slope / (2 * (1 - acp).sqrt())  # d√(1 − ᾱ)/dt
        return d_alpha.reshape(shape).to(like.dtype), d_sigma.reshape(shape).to(like.dtype)

    def timestep(self, level):
        return torch.as_tensor(level).clamp(min=0)  # level −1 → t = 0, as the LCM reference clamps

    def consistency_scalings(self, t, timestep_scaling=10.0):
        return boundary_scalings(t, timestep_scaling)


class FlowSchedule(Schedule):
    """Rectified flow: z_σ = (1 − σ) x₀ + σ ε with σ = t / N; the network predicts v = ε − x₀.

    ``shift`` is the timestep shift of SD3 (σ ← shift·σ / (1 + (shift − 1) σ), Esser et al. 2024,
    §5.3.2); a resolution-dependent shift (FLUX's ``mu``) is the same map with shift = e^mu, which the
    model bundle resolves for the training resolution."""

    kind = "flow"

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000, prediction_type: str = "flow"):
        super().__init__(prediction_type, num_train_timesteps)
        if prediction_type != "flow":
            raise ValueError("FlowSchedule predicts the velocity (prediction_type 'flow')")
        if not shift > 0:
            raise ValueError(f"the flow shift must be > 0, got {shift}")
        self.shift = float(shift)
        N = self.num_train_timesteps
        s = torch.arange(1, N + 1, dtype=torch.float64) / N
        self.sigmas = (self.shift * s / (1 + (self.shift - 1) * s)).float()  # σ_i, i = 0 … N−1, noisiest last
        self._copies: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_scheduler_config(cls, config, mu: float | None = None) -> FlowSchedule:
        """From a FlowMatchEulerDiscreteScheduler config; ``mu`` is the resolution-dependent shift of
        configs with ``use_dynamic_shifting`` (required for them)."""
        N = config.get("num_train_timesteps", 1000)
        if config.get("use_dynamic_shifting"):
            if mu is None:
                raise ValueError("this flow scheduler shifts by resolution: give mu")
            shift = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
            return cls(shift, N)
        return cls(config.get("shift", 1.0), N)

    def with_shift(self, shift: float) -> FlowSchedule:
        return FlowSchedule(shift, self.num_train_timesteps)

    def alpha_sigma(self, t, like):
        shape = self._shape(like)
        sigma = (torch.as_tensor(t, device=like.device).to(like.dtype) / self.num_train_timesteps).reshape(shape)
        return 1 - sigma, sigma

    def derivatives(self, t, like):
        shape = self._shape(like)
        one = torch.ones_like(torch.as_tensor(t, device=like.device), dtype=like.dtype).reshape(shape)
        return -one / self.num_train_timesteps, one / self.num_train_timesteps

    def timestep(self, level):
        level = torch.as_tensor(level)
        dev = level.device
        if dev not in self._copies:
            self._copies[dev] = self.sigmas.to(dev) * self.num_train_timesteps
        table = self._copies[dev]
        return torch.where(level < 0, torch.zeros((), device=dev), table[level.clamp(min=0)])

    def consistency_scalings(self, t, timestep_scaling=10.0):
        """f = x̂₀ = z − σ v̂: c_skip = 0, c_out = 1. The boundary condition holds exactly at σ = 0 (where
        x̂₀ = z), the clean end of the flow solver grid, with no scaling to tune."""
        t = torch.as_tensor(t)
        return torch.zeros_like(t, dtype=torch.float32), torch.ones_like(t, dtype=torch.float32)


def schedule_from_config(config, mu: float | None = None) -> Schedule:
    """The schedule of a diffusers scheduler config: flow matching for FlowMatch* schedulers, else the
    DDPM table the config describes."""
    if str(config.get("_class_name", "")).startswith("FlowMatch"):
        return FlowSchedule.from_scheduler_config(config, mu)
    return DDPMSchedule.from_scheduler_config(config)


def x0_eps_from_output(model_output, z_t, alpha, sigma, prediction_type: str):
    """Convert a model output to (x̂₀, ε̂) given α_t, σ_t already broadcast."""
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (z_t - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * z_t - sigma * model_output
        eps = alpha * model_output + sigma * z_t
    elif prediction_type == "sample":
        x0 = model_output
        eps = (z_t - alpha * x0) / sigma
    elif prediction_type == "flow":  # v = ε − x₀ and z = α x₀ + σ ε with α + σ = 1
        x0 = z_t - sigma * model_output
        eps = z_t + alpha * model_output
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor, sigma_prev: torch.Tensor):
    """Deterministic DDIM update (η = 0): z_prev = α_prev x̂₀ + σ_prev ε̂ (Song et al. 2021, eq. 12)."""
    return alpha_prev * x0 + sigma_prev * eps


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """c_skip(t), c_out(t) of the consistency parametrisation (LCM paper eq. 3; CM paper app. C).

    ``timestep_scaling`` sharpens the switch so that c_skip(0)=1, c_out(0)=0 while c_skip ≈ 0 for
    t ≳ 1 on the 0..999 grid (LCM uses 10).
    """
    scaled = timestep_scaling * t.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """mean(√((a − b)² + c²) − c): the pseudo-Huber loss of iCT (Song & Dhariwal 2023, §3.3)."""
    return torch.mean(torch.sqrt((a.float() - b.float()) ** 2 + c**2) - c)


def skip_step_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> tuple[torch.Tensor, int]:
    """The solver grid's levels τ = [k−1, 2k−1, …, N−1] with skip k = N / num_ddim_timesteps (LCM §4.3)."""
    if num_train_timesteps % num_ddim_timesteps:
        raise ValueError(
            f"--num_ddim_timesteps {num_ddim_timesteps} must divide the teacher's {num_train_timesteps} "
            f"training steps (try 50, 25 or 100)"
        )
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1, k
