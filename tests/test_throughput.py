"""benchmarks/throughput.py: the counted FLOPs, the MFU arithmetic, the profile buckets, and a tiny end-to-end
run of the ladder on the CPU (the script must work before a GPU session spends its time on it)."""

from __future__ import annotations

import importlib.util
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def T():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)


def test_sd15_unet_forward_flops_match_issue_8_and_cost_nothing(T):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the full config, defaults filled in, without allocating weights
        cfg = dict(UNet2DConditionModel(**SD15_UNET).config)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.perf_counter()
    flops = T.unet_forward_flops(cfg, 64)
    took = time.perf_counter() - t0
    grew_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20
    # Issue 8: an LCD step ≈ 6 forward-equivalents ≈ 5.2 TFLOP per sample at 64×64 latents.
    assert abs(flops - 5.2e12 / 6) / (5.2e12 / 6) < 0.10, flops
    # On the meta device: an fp32 SD1.5 UNet would take 3.2 GiB and a real forward many seconds here.
    assert grew_gib < 0.5 and took < 30, (grew_gib, took)
    # Attention is counted (SDPA decomposes on meta): 4096 tokens of self-attention at 320 channels alone
    # are 2·2·4096²·320 FLOP per transformer block, five such blocks.
    assert flops > 0.67e12 + 5 * 4 * 4096**2 * 320 * 0.9


def test_sdxl_components_are_sdxl_sized():
    from fewstep.testing import sdxl_components

    p = sdxl_components(device="meta")
    n = {k: sum(x.numel() for x in p[k].parameters()) for k in ("unet", "vae", "text_encoder", "text_encoder_2")}
    # SDXL 1.0 base's published parameter counts.
    assert n == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                 "text_encoder_2": 694_659_840}
    assert p["tokenizer_2"].pad_token == "!" and p["tokenizer"].pad_token == "<|endoftext|>"
    assert p["unet"].config.addition_embed_type == "text_time" and p["vae"].config.scaling_factor == 0.13025


def test_forward_equivalents_follow_the_methods_step_structure(T):
    from fewstep.methods.dmd2 import DMD2Config, phase_of
    from fewstep.methods.lcm import LCMConfig

    assert T.forward_equivalents("lcm", LCMConfig(), "student") == 6
    assert T.forward_equivalents("lcm", LCMConfig(lora_rank=64), "student") == 6
    d = DMD2Config()
    assert T.forward_equivalents("dmd2", d, "generator") == 6  # G fwd+bwd 3, fake 1, real cond+uncond 2
    assert T.forward_equivalents("dmd2", d, "guidance") == 4  # G no-grad 1, fake fwd+bwd 3
    assert T.forward_equivalents("dmd2", DMD2Config(real_guidance_scale=1.0), "generator") == 5
    assert T.forward_equivalents("dmd2", DMD2Config(fake_guidance_scale=2.0), "generator") == 7
    with pytest.raises(ValueError):
        T.forward_equivalents("dmd2", DMD2Config(gen_cls_loss_weight=5e-3), "generator")
    frac = T.phase_fractions(SimpleNamespace(phase=lambda s: phase_of(s, 10)), horizon=11_000)
    assert frac == {"generator": 1 / 11, "guidance": 10 / 11}


def test_summary_and_mfu_against_a_hand_computation(T):
    # Two phases: guidance steps of 0.2 s (median of 0.2, 0.2, 0.9), one generator step of 0.5 s.
    times = [0.2, 0.9, 0.2, 0.5]
    phases = ["guidance", "guidance", "guidance", "generator"]
    frac = {"generator": 1 / 11, "guidance": 10 / 11}
    out = T.summarise(times, phases, frac, {"generator": 6, "guidance": 4}, batch=12, flops_fwd=0.8e12,
                      peak=989.4e12)
    s = (0.5 + 10 * 0.2) / 11
    fe = (6 + 10 * 4) / 11
    assert out["s_per_step"] == pytest.approx(s)
    assert out["images_per_s"] == pytest.approx(12 / s)
    assert out["forward_equivalents"] == pytest.approx(fe)
    assert out["mfu"] == pytest.approx(fe * 0.8e12 * 12 / s / 989.4e12)
    # Issue 8's own example: 26.5 images/s × 6 × 0.867 TFLOP on an H100 ≈ 14%.
    assert T.mfu(6, 5.2e12 / 6, 26.5, T.peak_flops_of("NVIDIA H100 80GB HBM3")) == pytest.approx(0.139, abs=0.002)
    assert T.mfu(6, 1e12, 10, None) is None
    assert T.peak_flops_of("NVIDIA H100 PCIe") == 756.5e12
    assert T.peak_flops_of("NVIDIA H200") == 989.4e12 and T.peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert T.peak_flops_of("Some Other GPU") is None


def test_reference_matching_only_on_the_issue_settings(T):
    gpu = SimpleNamespace(tiny=False, model="sd15", resolution=512, batch=12)
    rec = {"setting": "LCD full", "keys": {"gradient_checkpointing": False}}
    assert T.reference_of(rec, gpu) == (0.453, 33.0)
    assert T.reference_of({"setting": "LCM-LoRA r64", "keys": {"gradient_checkpointing": True}}, gpu) == (0.800, 12.2)
    assert T.reference_of(rec, SimpleNamespace(tiny=True, model="sd15", resolution=32, batch=2)) is None
    assert T.reference_of(rec, SimpleNamespace(tiny=False, model="sd15", resolution=512, batch=8)) is None
    assert T.reference_of({"setting": None, "keys": {}}, gpu) is None


def test_profile_buckets(T):
    b = T.bucket_of
    assert b("aten::convolution_backward") == b("aten::cudnn_convolution") == "convolution"
    assert b("aten::_scaled_dot_product_efficient_attention") == "attention (SDPA)"
    assert b("aten::addmm") == b("aten::mm") == b("aten::bmm") == "matmul / linear"
    assert b("aten::native_group_norm") == b("aten::native_layer_norm_backward") == "normalisation"
    assert b("aten::_foreach_lerp_") == b("aten::_fused_adamw_") == T.OPTIMIZER
    assert b("aten::mul", in_optimizer=True) == T.OPTIMIZER
    assert b("aten::t") == b("aten::view") == "views / allocation (no compute)"
    assert b("aten::tanh") == b("aten::silu") == "elementwise / other"
    assert b("aten::copy_") == "copies / casts / memset"
    assert T._union_us([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4


def test_keys_text_shows_what_a_row_adds(T):
    prev = {"method": "lcm", "keys": {"gradient_checkpointing": False}}
    assert T.keys_text({"gradient_checkpointing": False, "cache_dir": T.CACHE}, prev) == "+ cache_dir=(cache)"
    assert T.keys_text({"gradient_checkpointing": True}, prev) == "gradient_checkpointing=True"
    ladder = T.ladder_rows()
    assert [r.keys.get("torch_compile_mode") for r in ladder][-1] == "reduce-overhead"
    assert all(set(a.keys) < set(b.keys) for a, b in zip(ladder, ladder[1:]))  # cumulative, one lever each


def test_tiny_ladder_end_to_end(tmp_path, T):
    out = tmp_path / "r.md"
    prof = tmp_path / "p.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--tiny", "--rows", "ladder", "--steps", "2",
           "--warmup", "1", "--peak_tflops", "1", "--profile", str(prof), "--out", str(out),
           "--workdir", str(tmp_path / "work")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    want = [row.label for row in T.ladder_rows()]
    assert [x["label"].split(" [no GPU")[0] for x in rows] == want
    # Without a GPU the compile row runs on aot_eager, and the CUDA-graph row (inductor only) would
    # repeat it: skipped. The compiled step is three graphs (student, teacher, target) without breaks,
    # none compiled again in the timed steps.
    assert [x["status"] for x in rows] == ["ok"] * 6 + ["skipped"], [x.get("error") for x in rows]
    assert rows[5]["keys"]["torch_compile_backend"] == "aot_eager"
    assert (rows[5]["compiled_frames"], rows[5]["graph_breaks"], rows[5]["recompiles_timed"]) == (3, 0, 0)
    assert "compiled_frames" not in rows[4]
    flops = data["meta"]["flops_fwd"]
    assert flops > 0
    for x in rows[:6]:
        assert math.isfinite(x["s_per_step"]) and x["s_per_step"] > 0 and len(x["step_times_s"]) == 2
        assert x["images_per_s"] == pytest.approx(2 / x["s_per_step"])
        assert x["forward_equivalents"] == 6
        assert x["mfu"] == pytest.approx(6 * flops * x["images_per_s"] / 1e12)
    assert rows[2]["keys"]["cache_dir"] == "<cache>" and data["meta"]["cache_s"] > 0
    assert "CPU tiny run" in out.read_text() and "| LCD full, ckpt off, + cache_dir |" in out.read_text()
    text = prof.read_text()
    shares = [float(line.split("|")[3].strip().rstrip("%")) for line in text.splitlines()
              if line.startswith("| ") and line.count("|") == 4 and "%" in line]
    assert sum(shares) == pytest.approx(100, abs=0.5) and "convolution" in text


def test_profile_summary_reads_real_profiler_events(T):
    """Both branches against a real torch.profiler result (the CUDA branch sees no kernels on a CPU: all
    of the wall time is then idle GPU time), so attribute names and the arithmetic are exercised."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 4))
    opt = torch.optim.AdamW(net.parameters(), foreach=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            net(torch.randn(2, 3, 8, 8)).square().mean().backward()
            opt.step()
    cpu = T.profile_summary(prof, wall_s=0.5, steps=2, on_cuda=False, title="t")
    rows = {line.split("|")[1].strip(): float(line.split("|")[3].strip().rstrip("%"))
            for line in cpu.split("## Top")[0].splitlines() if line.startswith("| ") and "%" in line}
    assert {"convolution", "normalisation", "matmul / linear", T.OPTIMIZER} <= set(rows)
    assert sum(rows.values()) == pytest.approx(100, abs=0.5)
    gpu = T.profile_summary(prof, wall_s=0.5, steps=2, on_cuda=True, title="t")
    assert "| GPU idle between kernels (wall − busy) | 250.00 | 100.0% |" in gpu


def test_bad_arguments_are_refused(T):
    with pytest.raises(SystemExit):
        T.parse(["--tiny", "--bpe", "x.gz"])
    with pytest.raises(SystemExit):
        T.parse(["--resolution", "500"])
    a = T.parse(["--tiny"])
    assert (a.batch, a.resolution, a.mixed_precision, a.threads, a.workers) == (2, 32, "no", 1, 0)
    g = T.parse(["--model", "sdxl"])
    assert (g.batch, g.resolution, g.steps, g.warmup, g.compile_warmup) == (4, 1024, 30, 10, 25)
