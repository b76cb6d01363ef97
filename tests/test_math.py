"""Pure diffusion math against diffusers' own implementations and closed forms."""

import pytest
import torch

from fewstep.diffusion.guidance import guidance_scale_embedding
from fewstep.diffusion.schedule import (
    DDPMSchedule,
    boundary_scalings,
    ddim_step,
    pseudo_huber,
    skip_step_grid,
)
from fewstep.training.ema import ema_update


def sd_schedule(pred="epsilon"):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=pred,
                      clip_sample=False, set_alpha_to_one=False)
    return s, DDPMSchedule(s.alphas_cumprod, pred)


def test_boundary_scalings_match_lcm_scheduler():
    from diffusers import LCMScheduler

    sched = LCMScheduler(timestep_scaling=10.0)
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = boundary_scalings(t, 10.0)
    for i, ti in enumerate(t.tolist()):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(float(ref_skip), rel=1e-6)
        assert c_out[i].item() == pytest.approx(float(ref_out), rel=1e-6)
    assert c_skip[0] == 1 and c_out[0] == 0  # the boundary condition f(x, 0) = x


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_x0_eps_round_trip(pred):
    _, sch = sd_schedule(pred)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([1, 250, 500, 999])
    z = sch.add_noise(x0, eps, t)
    x0_hat, eps_hat = sch.to_x0_eps(sch.target(x0, eps, t), z, t)
    assert torch.allclose(x0_hat, x0, atol=2e-3 if pred == "sample" else 1e-4)
    assert torch.allclose(eps_hat, eps, atol=1e-3)


def test_add_noise_matches_diffusers():
    ref, sch = sd_schedule()
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 980])
    assert torch.allclose(sch.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-5)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_step_matches_diffusers(pred):
    ref, sch = sd_schedule(pred)
    ref.set_timesteps(50)  # leading spacing: 981, 961, ... step of 20
    z = torch.randn(2, 4, 8, 8)
    out = torch.randn(2, 4, 8, 8)
    t = int(ref.timesteps[10])
    prev = t - 20
    expected = ref.step(out, t, z, eta=0.0).prev_sample
    tt = torch.full((2,), t)
    x0, eps = sch.to_x0_eps(out, z, tt)
    a, s = sch.alpha_sigma(torch.full((2,), prev), z)
    assert torch.allclose(ddim_step(x0, eps, a, s), expected, atol=1e-5)


def test_guidance_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 3.5, 7.0, 14.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert torch.allclose(guidance_scale_embedding(w, 256), ref, atol=1e-5)
    ref_odd = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=33)
    assert torch.allclose(guidance_scale_embedding(w, 33), ref_odd, atol=1e-5)


def test_pseudo_huber_formula_and_limits():
    a, b = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 1.0])
    c = 0.1
    expected = ((a - b) ** 2 + c**2).sqrt().sub(c).mean()
    assert pseudo_huber(a, b, c).item() == pytest.approx(expected.item())
    # Far from 0 it behaves like |a − b| − c; at a = b it is exactly 0.
    assert pseudo_huber(torch.tensor([100.0]), torch.tensor([0.0]), 1e-3).item() == pytest.approx(100 - 1e-3, rel=1e-6)
    assert pseudo_huber(b, b, c).item() == 0


def test_skip_step_grid():
    tau, k = skip_step_grid(1000, 50)
    assert k == 20 and tau[0] == 19 and tau[-1] == 999 and len(tau) == 50
    with pytest.raises(ValueError, match="must divide"):
        skip_step_grid(1000, 30)


def test_ema_update_math():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for b, p_t, p_o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(p_t, 0.9 * b + 0.1 * p_o.detach(), atol=1e-6)
