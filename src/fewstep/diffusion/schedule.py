"""Pure diffusion math: noise schedules, prediction-type conversions, consistency scalings.

Every function here works on tensors only; nothing knows about model classes. Symbols follow the
papers: ᾱ_t is ``alphas_cumprod[t]``, α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), x̂₀ the predicted clean latent.
"""

from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """The discrete DDPM schedule of a teacher (N training steps), as α_t and σ_t lookup tables."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported; use epsilon, v_prediction or sample"
            )
        self.alphas_cumprod = alphas_cumprod.double()
        self.alpha = self.alphas_cumprod.sqrt().float()  # α_t
        self.sigma = (1.0 - self.alphas_cumprod).sqrt().float()  # σ_t
        self.prediction_type = prediction_type
        self.num_train_timesteps = len(alphas_cumprod)
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_scheduler_config(cls, config) -> NoiseSchedule:
        """Build from a diffusers scheduler config (any of the DDPM-family schedulers)."""
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(config)
        return cls(sched.alphas_cumprod, sched.config.prediction_type)

    def to(self, device) -> NoiseSchedule:
        self.alpha = self.alpha.to(device)
        self.sigma = self.sigma.to(device)
        self._copies = {}
        return self

    def coeffs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α_t and σ_t broadcast to the shape of ``like``."""
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha, sigma = self._tables(like.device)
        a = alpha[t].reshape(shape).to(like.dtype)
        s = sigma[t].reshape(shape).to(like.dtype)
        return a, s

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """α and σ on ``device``, copied once: a copy from host memory per call would make the host
        wait for the GPU to finish its queue several times per training step."""
        if self.alpha.device == device:
            return self.alpha, self.sigma
        if device not in self._copies:
            self._copies[device] = (self.alpha.to(device), self.sigma.to(device))
        return self._copies[device]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = α_t x₀ + σ_t ε (forward process, DDPM eq. 4)."""
        a, s = self.coeffs(t, x0)
        return a * x0 + s * eps

    def to_x0_eps(self, model_output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor):
        """(x̂₀, ε̂) from a model output of this schedule's prediction type."""
        a, s = self.coeffs(t, z_t)
        return x0_eps_from_output(model_output, z_t, a, s, self.prediction_type)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a model of this prediction type is trained to output."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        a, s = self.coeffs(t, x0)
        return a * eps - s * x0  # v = α ε − σ x₀ (Salimans & Ho 2022, §4)


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


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of 1000·w (VDM-style) fed to the student's ``time_embedding.cond_proj``.

    Same function as diffusers' LCM pipelines use at inference, so a student trained on w sees
    ``guidance_scale − 1`` there.
    """
    w = w.reshape(-1).float() * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """mean(√((a − b)² + c²) − c): the pseudo-Huber loss of iCT (Song & Dhariwal 2023, §3.3)."""
    return torch.mean(torch.sqrt((a.float() - b.float()) ** 2 + c**2) - c)


def skip_step_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> tuple[torch.Tensor, int]:
    """The DDIM grid τ = [k−1, 2k−1, …, N−1] with skip k = N / num_ddim_timesteps (LCM §4.3)."""
    if num_train_timesteps % num_ddim_timesteps:
        raise ValueError(
            f"--num_ddim_timesteps {num_ddim_timesteps} must divide the teacher's {num_train_timesteps} "
            f"training steps (try 50, 25 or 100)"
        )
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1, k
