"""The continuous-time schedules against diffusers' own schedulers and closed forms: the flow table
and shift, noising, the Euler step, α/σ derivatives, the clean end of the grid, and the sampling
arguments that make a stock scheduler visit exactly the training timesteps."""

import math

import pytest
import torch

from fewstep.diffusion.schedule import DDPMSchedule, FlowSchedule, schedule_from_config


def flow_sched(shift=3.0, **kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, **kw)


def config_of(sched) -> dict:
    """A scheduler's config as its folder stores it (with the class name)."""
    return {**sched.config, "_class_name": type(sched).__name__}


def ddpm():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False)
    return s, DDPMSchedule(s.alphas_cumprod, "epsilon")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_levels_are_the_training_table_of_diffusers(shift):
    ref = flow_sched(shift)
    sch = schedule_from_config(config_of(ref))
    assert isinstance(sch, FlowSchedule) and sch.shift == shift
    levels = torch.arange(1000)
    # diffusers keeps the table noisiest first; level i is its entry N − 1 − i
    assert torch.allclose(sch.timestep(levels), ref.timesteps.flip(0), atol=1e-3)
    assert sch.timestep(torch.tensor(999)).item() == 1000.0  # σ = 1: pure noise
    assert sch.timestep(torch.tensor(-1)).item() == 0.0  # the clean end


def test_flow_noising_prediction_and_target():
    ref, sch = flow_sched(), FlowSchedule(3.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    levels = torch.tensor([0, 400, 999])
    t = sch.timestep(levels)
    z = sch.add_noise(x0, eps, t)
    sigma = ref.sigmas[999 - levels].view(-1, 1, 1, 1)  # diffusers' training σ of each level
    assert torch.allclose(z, sigma * eps + (1 - sigma) * x0, atol=1e-6)  # FlowMatchEuler's scale_noise
    v = sch.target(x0, eps, t)
    assert torch.equal(v, eps - x0)
    x0_hat, eps_hat = sch.to_x0_eps(v, z, t)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)


def test_one_solver_step_is_the_flow_euler_step():
    """DDIM's α_s x̂₀ + σ_s ε̂ on the flow path is diffusers' Euler step z + (σ_next − σ) v."""
    ref, sch = flow_sched(), FlowSchedule(3.0)
    ref.set_timesteps(4)
    z, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, s = ref.timesteps[1], ref.timesteps[2]
    ref._step_index = 1
    expected = ref.step(v, t, z).prev_sample
    x0, eps = sch.to_x0_eps(v, z, t)
    assert torch.allclose(sch.step(x0, eps, s), expected, atol=1e-5)


def test_derivatives_match_finite_differences():
    _, dd = ddpm()
    like = torch.zeros(3, 1)
    for sch, ts in ((dd, [10.5, 400.25, 900.75]), (FlowSchedule(3.0), [10.0, 400.0, 990.0])):
        t = torch.tensor(ts, dtype=torch.float64)
        h = 1e-3
        (a1, s1), (a0, s0) = sch.alpha_sigma(t + h, like.double()), sch.alpha_sigma(t - h, like.double())
        da, ds = sch.derivatives(t, like.double())
        assert torch.allclose(da, (a1 - a0) / (2 * h), rtol=1e-4, atol=1e-9)
        assert torch.allclose(ds, (s1 - s0) / (2 * h), rtol=1e-4, atol=1e-9)


def test_ddpm_real_timesteps_extend_the_table():
    _, sch = ddpm()
    like = torch.zeros(4, 1)
    t = torch.tensor([0, 1, 500, 999])
    a_int, s_int = sch.alpha_sigma(t, like)
    a_real, s_real = sch.alpha_sigma(t.double(), like)
    assert torch.allclose(a_int, a_real, atol=1e-6) and torch.allclose(s_int, s_real, atol=1e-6)
    a_mid, _ = sch.alpha_sigma(torch.tensor([500.5]), like[:1])
    lo, hi = sch.alphas_cumprod[500], sch.alphas_cumprod[501]
    assert a_mid.item() == pytest.approx(math.sqrt((lo + hi) / 2), rel=1e-6)
    assert torch.equal(sch.timestep(torch.tensor([-1, 0, 999])), torch.tensor([0, 0, 999]))


def test_flow_consistency_function_meets_the_boundary_exactly():
    sch = FlowSchedule(3.0)
    z, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t0 = sch.timestep(torch.tensor([-1, -1]))
    c_skip, c_out = sch.consistency_scalings(t0)
    f = c_skip.view(-1, 1, 1, 1) * z + c_out.view(-1, 1, 1, 1) * sch.to_x0_eps(v, z, t0)[0]
    assert torch.equal(f, z)  # f(z, 0) = z, not approximately


def test_dynamic_shift_is_a_static_shift_of_exp_mu():
    ref = flow_sched(1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    mu = 0.8
    sch = schedule_from_config(config_of(ref), mu=mu)
    assert sch.shift == pytest.approx(math.exp(mu))
    ref.set_timesteps(8, mu=mu)
    own = FlowSchedule(math.exp(mu))
    # the stock scheduler's own grid, recomputed with the static shift e^mu
    unshifted = torch.linspace(1.0, 1 / 1000, 8).double()
    expected = own.shift * unshifted / (1 + (own.shift - 1) * unshifted)
    assert torch.allclose(ref.sigmas[:-1].double(), expected, atol=1e-5)


@pytest.mark.parametrize("levels", [[399], [999, 749, 499, 249]])
def test_explicit_timesteps_reach_a_flow_scheduler_exactly(levels, tmp_path):
    """timestep_kwargs gives a flow scheduler the sigmas that it shifts back to the training timesteps."""
    from fewstep.models.bundle import load_bundle
    from fewstep.testing import build_tiny_sd3

    bundle = load_bundle(str(build_tiny_sd3(tmp_path / "t")), weights=False)
    ts = bundle.schedule.timestep(torch.tensor(levels)).tolist()
    ref = flow_sched(3.0)
    ref.set_timesteps(**bundle.timestep_kwargs(32, 32, ts))
    assert torch.allclose(ref.timesteps, torch.tensor(ts), atol=1e-3)
