"""The speed levers change how a step runs, never what it computes.

Each test runs the same steps twice from the same seed, once plain and once with levers on, and
compares the losses, the gradients handed to the optimizer and the weights after the steps. The
levers are also checked to be in force (channels-last weights, fused kernels, autocast inside the
frozen networks), so that an equality could not come from a lever silently doing nothing.
"""

import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters

from conftest import run_args
from fewstep.cli import parse_run
from fewstep.training.speed import denoisers, held_networks
from fewstep.training.trainer import Trainer

METHODS = {
    "lcm": dict(method="lcm"),
    "lcm-lora": dict(method="lcm", lora_rank=4, lora_alpha=8, learning_rate=1e-3),
    "dmd2": dict(method="dmd2", dfake_gen_update_ratio=1, real_guidance_scale=2.0),
}
LEVERS = dict(channels_last=True, adam_impl="fused")
# ε ≫ |g| keeps Adam's update proportional to the gradient: with the default 1e-8, the first updates
# are lr · sign(g), and an element whose gradient is near zero flips sign under any reordered sum.
STABLE_ADAM = dict(adam_epsilon=1e-3)


def run(teacher, data, out, steps=2, **kw):
    """Steps of a tiny run; returns the trainer, the logs, the gradients each optimizer step saw, and
    how far the trainable weights moved."""
    tr = Trainer(parse_run(run_args(teacher, data, out, **{**STABLE_ADAM, **kw})))
    tr.start()
    start = {n: [p.detach().clone() for p in ps] for n, ps in tr.params.items()}
    grads = []
    for name, opt in tr.opts.items():
        params, inner = tr.params[name], opt.step

        def step(*a, _params=params, _inner=inner, **k):
            grads.append([p.grad.detach().clone() for p in _params if p.grad is not None])
            return _inner(*a, **k)

        opt.step = step
    logs = []
    for _ in range(steps):
        logs.append(tr.step())
        # frames dynamo has compiled so far (first compilations and recompilations alike)
        tr.compiled_frames = getattr(tr, "compiled_frames", []) + [dynamo_counters["frames"]["total"]]
    # (the move, and the float32 rounding of the weight it is measured on: 4 units in the last place)
    moved = {n: [(p.detach() - p0, 4 * torch.finfo(torch.float32).eps * p.detach().norm())
                 for p, p0 in zip(ps, start[n])] for n, ps in tr.params.items()}
    return tr, logs, grads, moved


def close(x, y, rtol, floor=1e-12):
    """Relative to the tensor's size: reordered float sums (another kernel, another memory layout)
    move single elements near zero by more than an elementwise tolerance allows."""
    assert (y.float() - x.float()).norm() <= rtol * x.float().norm() + floor


def assert_same(a, b, rtol, atol, weights=True):
    (_, logs_a, grads_a, w_a), (_, logs_b, grads_b, w_b) = a, b
    for la, lb in zip(logs_a, logs_b):
        assert la.keys() == lb.keys()
        for k in la:
            assert lb[k] == pytest.approx(la[k], rel=rtol, abs=atol), k
    assert len(grads_a) == len(grads_b) > 0
    for ga, gb in zip(grads_a, grads_b):
        assert len(ga) == len(gb) > 0
        for x, y in zip(ga, gb):
            close(x, y, rtol)
    for n in w_a if weights else []:  # how far each weight tensor moved
        for (x, ulp), (y, _) in zip(w_a[n], w_b[n]):
            close(x, y, rtol, floor=ulp)


@pytest.mark.parametrize("key", list(METHODS))
def test_levers_give_the_plain_step_fp32(key, tiny_teacher, caption_folder, tmp_path):
    plain = run(tiny_teacher, caption_folder, tmp_path / "a", **METHODS[key], adam_impl="foreach")
    fast = run(tiny_teacher, caption_folder, tmp_path / "b", **METHODS[key], **LEVERS)
    assert_same(plain, fast, rtol=5e-3, atol=1e-6)

    # The levers were in force: every 4-D weight of every held network is channels-last, and the
    # optimizers run the fused kernels.
    tr = fast[0]
    nets = held_networks(tr.method, tr.bundle)
    # (1×1 kernels have the same strides in both layouts; the 3×3 ones tell them apart)
    weights3x3 = [p for net in nets for p in net.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert weights3x3 and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                              for p in weights3x3)
    assert all(opt.optimizer.defaults["fused"] for opt in tr.opts.values())
    assert not any(opt.optimizer.defaults["fused"] for opt in plain[0].opts.values())


def test_levers_give_the_plain_step_bf16(tiny_teacher, caption_folder, tmp_path):
    """Under bf16 autocast, with the teacher held in bf16 (--cast_teacher_unet) on top: the rounding
    differs (bf16 has 8 bits of mantissa, and the LCD residual f_θ − target is a small difference of
    two predictions), so the check is on the whole gradient: its direction and its size. Measured
    here: the cast alone gives a bit-identical first step and cosine 0.983 on the second; channels-last
    alone (another CPU convolution kernel) 0.995 on both. A real change gives far less: guidance
    w = 1 instead of U[5, 15] gives 0.42 and 0.77, a 20-step teacher grid instead of 50 gives 0.55."""
    kw = dict(mixed_precision="bf16")
    plain = run(tiny_teacher, caption_folder, tmp_path / "a", **kw, adam_impl="foreach")
    fast = run(tiny_teacher, caption_folder, tmp_path / "b", **kw, cast_teacher_unet=True, **LEVERS)
    assert fast[0].bundle.denoiser.dtype == torch.bfloat16 and plain[0].bundle.denoiser.dtype == torch.float32
    for la, lb in zip(plain[1], fast[1]):
        assert lb["loss"] == pytest.approx(la["loss"], rel=5e-2)
    for ga, gb in zip(plain[2], fast[2]):
        a, b = torch.cat([g.flatten() for g in ga]), torch.cat([g.flatten() for g in gb])
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.97
        assert b.norm() == pytest.approx(a.norm().item(), rel=5e-2)


def test_frozen_networks_run_under_autocast(tiny_teacher, caption_folder, tmp_path):
    """The teacher and the EMA target are not wrapped by accelerate, yet must run in the mixed-precision
    dtype: held in fp32, they used to run in fp32 and cost most of an LCD step's time on a GPU."""
    tr = Trainer(parse_run(run_args(tiny_teacher, caption_folder, tmp_path / "o", mixed_precision="bf16")))
    tr.start()
    seen = {}
    for name, net in (("teacher", tr.method.teacher), ("target", tr.method.target)):
        assert next(net.parameters()).dtype == torch.float32  # held in fp32 (no --cast_teacher_unet)
        net.conv_in.register_forward_hook(lambda m, i, o, name=name: seen.update({name: o.dtype}) and None)
    tr.step()
    assert seen == {"teacher": torch.bfloat16, "target": torch.bfloat16}


def test_denoisers_are_found_once_each(tiny_teacher, caption_folder, tmp_path):
    """LCD full holds three UNets (student, teacher, EMA target); LCM-LoRA holds one."""
    for kw, n in ((METHODS["lcm"], 3), (METHODS["lcm-lora"], 1)):
        tr = Trainer(parse_run(run_args(tiny_teacher, caption_folder, tmp_path / str(n), **kw)))
        assert len(denoisers(held_networks(tr.method, tr.bundle), type(tr.bundle.denoiser))) == n


def test_bad_speed_keys_are_refused(tiny_teacher, caption_folder, tmp_path):
    from fewstep.config import ConfigError

    with pytest.raises(ConfigError, match="--adam_impl must be"):
        parse_run(run_args(tiny_teacher, caption_folder, tmp_path, adam_impl="turbo"))
    with pytest.raises(ConfigError, match="--torch_compile_mode must be"):
        parse_run(run_args(tiny_teacher, caption_folder, tmp_path, torch_compile=True, torch_compile_mode="fast"))


def test_torch_compile_is_refused_on_the_cpu(tiny_teacher, caption_folder, tmp_path):
    """CPU inductor (torch 2.13) gets the UNet's gradients wrong; the run must say so, not train on them."""
    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU-only machines")
    from fewstep.config import ConfigError

    with pytest.raises(ConfigError, match="inductor backend is for CUDA"):
        Trainer(parse_run(run_args(tiny_teacher, caption_folder, tmp_path, torch_compile=True)))
    from fewstep.cli import main

    assert main(["distill", *run_args(tiny_teacher, caption_folder, tmp_path, torch_compile=True), "--dry_run"]) == 2
    with pytest.raises(ConfigError, match="--torch_compile_mode applies to the inductor backend only"):
        parse_run(run_args(tiny_teacher, caption_folder, tmp_path, torch_compile=True,
                           torch_compile_backend="aot_eager", torch_compile_mode="reduce-overhead"))


# (the README's LCD command uses gradient checkpointing, whose torch.utils.checkpoint regions dynamo
# traces as one operator: the compiled run must handle them too)
COMPILED = {"lcm": dict(METHODS["lcm"], gradient_checkpointing=True), "lcm-lora": METHODS["lcm-lora"],
            "dmd2": METHODS["dmd2"]}


@pytest.mark.parametrize("key", ["lcm", "lcm-lora", pytest.param("dmd2", marks=pytest.mark.slow)])
def test_compiled_step_is_the_plain_step_and_compiles_once(key, tiny_teacher, caption_folder, tmp_path):
    """torch.compile on the CPU with the aot_eager backend: dynamo captures the same graphs as on a GPU
    and autograd is traced ahead of time, but the kernels stay eager, so the step must equal the plain
    one to float32 rounding (measured here: bit-identical losses over 6 steps of each method).

    It also pins what decides compiled speed on a GPU: every denoiser call is ONE graph without breaks,
    and after the first cycle nothing recompiles (a guard that fails every step, on a LoRA adapter
    toggle, a dtype or a requires_grad flip, would recompile for minutes and then fall back to eager).
    Three frames for every method: LCD's student, teacher and target; LCM-LoRA's one UNet run with
    gradients, with adapters disabled (the teacher) and without gradients (the target); DMD2's
    generator, real score and fake score."""
    steps = 4
    plain = run(tiny_teacher, caption_folder, tmp_path / "a", steps=steps, **COMPILED[key])
    torch._dynamo.reset()
    dynamo_counters.clear()
    fast = run(tiny_teacher, caption_folder, tmp_path / "b", steps=steps, **COMPILED[key],
               torch_compile=True, torch_compile_backend="aot_eager")
    assert_same(plain, fast, rtol=1e-5, atol=1e-8)
    assert fast[0].compiled_frames == [3] * steps  # all compiled in step 1, none after
    assert not dynamo_counters["graph_break"], dict(dynamo_counters["graph_break"])
    torch._dynamo.reset()  # the compiled graphs hold this run's modules


@pytest.mark.gpu
@pytest.mark.parametrize("key", ["lcm", "lcm-lora"])
def test_torch_compile_gives_the_plain_step(key, tiny_teacher, caption_folder, tmp_path):
    """torch.compile of every denoiser, on a GPU (the CPU backend is refused, see above)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    plain = run(tiny_teacher, caption_folder, tmp_path / "a", **METHODS[key], adam_impl="foreach")
    fast = run(tiny_teacher, caption_folder, tmp_path / "b", **METHODS[key], torch_compile=True, **LEVERS)
    assert_same(plain, fast, rtol=5e-3, atol=1e-6)
