"""GPU throughput of fewstep's distillation step: s/step, images/s, peak memory and MFU, lever by lever.

Each row is a fresh `Trainer` running the real `fewstep distill` step on a random-weight SD1.5 (or
SDXL) teacher saved to a temporary folder, reading synthetic WebDataset shards of 576 px JPEGs with
captions (or, for rows with the cache lever, the `fewstep cache` written from those shards first).
A row is (method, config keys); the keys are ordinary `fewstep distill` options, so a row's speed is
what users get with the same flags.

    python benchmarks/throughput.py --rows all --bpe ../shared/data/clip/bpe_simple_vocab_16e6.txt.gz \\
        --profile benchmarks/PROFILE.md --out benchmarks/THROUGHPUT_H100.md     # GPU: SD1.5, 512 px, batch 12
    python benchmarks/throughput.py --tiny --rows all --out /tmp/t.md             # CPU: tiny model, a quick check

Row sets (``--rows``): ``ladder`` (LCD full, no gradient checkpointing, levers added one at a time),
``reference`` (issue 8's four settings with every lever that applies), ``dmd2`` (DMD2 without and with
levers), ``all``. ``--profile`` profiles a few more steps of the ladder's last row (every lever) or,
without the ladder, of the last row, and writes where the time goes. A row that fails (compile unsupported, out of memory, ...) is recorded with the first
line of its error and the next row runs.

Measures per row: median s/step over the steps after warm-up (CUDA synchronised around every step),
images/s = global batch / s/step, peak allocated GPU memory (reset per row, models included) and model
FLOP utilisation MFU = forward equivalents × F_fwd × images/s / peak FLOP/s, where F_fwd is the UNet's
forward FLOPs per sample at the row's latent size, counted by torch's FlopCounterMode on a meta-device
UNet (no memory, no weights) and forward equivalents are derived per method below.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import write_shards  # noqa: E402  (benchmarks/loader.py: the same 576 px JPEG shards)

CACHE = "<cache>"  # placeholder in a row's keys: the cache folder written before the rows run

# Issue 8's measurements of diffusers' reference scripts on one H100 (SD1.5 architecture, 512 px, batch
# 12, fp16): (s/step, peak allocated GiB) by (setting, gradient checkpointing).
REFERENCE = {("LCD full", True): (0.540, 23.1), ("LCD full", False): (0.453, 33.0),
             ("LCM-LoRA r64", True): (0.800, 12.2), ("LCM-LoRA r64", False): (0.653, 27.2)}

# Dense fp16/bf16 tensor-core peaks (no sparsity), FLOP/s, matched against the CUDA device name in order.
PEAK_FLOPS = [("H100 PCIe", 756.5e12), ("H100", 989.4e12), ("H200", 989.4e12), ("GH200", 989.4e12),
              ("A100", 312e12), ("L40S", 362.1e12), ("A10G", 70e12), ("RTX 4090", 165.2e12)]

LORA = {"lora_rank": 64, "learning_rate": 1e-4}


@dataclasses.dataclass
class Row:
    label: str
    method: str
    keys: dict  # config keys on top of the common ones (data, batch, precision, ...)
    setting: str | None = None  # issue 8's reference setting this row is comparable to ("LCD full", ...)
    compile_dropped: bool | str = False  # no GPU: compiled with aot_eager instead (inductor is refused on the CPU)
    group: str = ""  # the row set it belongs to; speed-ups are against the set's first row

    @property
    def compiled(self) -> bool:
        return bool(self.keys.get("torch_compile"))


def ladder_rows(compile_mode: str = "reduce-overhead") -> list[Row]:
    """LCD full without gradient checkpointing, levers added cumulatively, one per row."""
    steps = [("base defaults", {}), ("+ cast_teacher_unet", {"cast_teacher_unet": True}),
             ("+ cache_dir", {"cache_dir": CACHE}), ("+ channels_last", {"channels_last": True}),
             ("+ adam_impl fused", {"adam_impl": "fused"}), ("+ torch_compile", {"torch_compile": True}),
             (f"+ torch_compile_mode {compile_mode}", {"torch_compile_mode": compile_mode})]
    rows, keys = [], {"gradient_checkpointing": False}
    for label, add in steps:
        keys = {**keys, **add}
        rows.append(Row(f"LCD full, ckpt off, {label}", "lcm", dict(keys), "LCD full"))
    return rows


def levers(method: str, lora: bool, compile_mode: str) -> dict:
    """Every lever that applies: a LoRA student's frozen base is already held in half precision."""
    out = {} if lora else {"cast_teacher_unet": True}
    return {**out, "cache_dir": CACHE, "channels_last": True, "adam_impl": "fused", "torch_compile": True,
            "torch_compile_mode": compile_mode}


def reference_rows(compile_mode: str = "reduce-overhead") -> list[Row]:
    rows = []
    for setting, extra in (("LCD full", {}), ("LCM-LoRA r64", LORA)):
        for ckpt in (True, False):
            keys = {**extra, "gradient_checkpointing": ckpt, **levers("lcm", bool(extra), compile_mode)}
            rows.append(Row(f"{setting}, ckpt {'on' if ckpt else 'off'}, all levers", "lcm", keys, setting))
    return rows


def dmd2_rows(compile_mode: str = "reduce-overhead") -> list[Row]:
    """DMD2 (one-step generator, default schedule): plain, the levers without and with torch.compile, and
    the LoRA fake score (two UNets in memory instead of three) with every lever."""
    base = {"gradient_checkpointing": False}
    lev = levers("dmd2", False, compile_mode)
    no_compile = {k: v for k, v in lev.items() if not k.startswith("torch_compile")}
    return [Row("DMD2, ckpt off, base defaults", "dmd2", dict(base)),
            Row("DMD2, ckpt off, levers without compile", "dmd2", {**base, **no_compile}),
            Row("DMD2, ckpt off, all levers", "dmd2", {**base, **lev}),
            Row("DMD2 LoRA-64 fake score, ckpt off, all levers", "dmd2", {**base, **lev, "fake_score_lora_rank": 64})]


ROW_SETS = {"ladder": ladder_rows, "reference": reference_rows, "dmd2": dmd2_rows}


# ---- FLOPs ---------------------------------------------------------------------------------------
def unet_forward_flops(unet_config: dict, latent_size: int, text_len: int = 77) -> int:
    """FLOPs of one UNet forward for one sample (batch 1, ``text_len`` text states), counted by torch's
    FlopCounterMode (2 per multiply-add of convolutions, matmuls and attention) on a meta-device UNet
    built from ``unet_config``: no memory is allocated and no kernel runs, so this is cheap even for SDXL."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
        x = torch.zeros(1, cfg.get("in_channels", 4), latent_size, latent_size)
        ehs = torch.zeros(1, text_len, cfg["cross_attention_dim"])
        t = torch.tensor([500])
        extra = {}
        if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + 6 micro-conditioning ids
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=ehs, **extra)
    return int(counter.get_total_flops())


def forward_equivalents(method: str, mcfg, phase: str) -> float:
    """UNet forward-equivalents per sample of one optimizer step of ``phase`` (a training forward and
    its backward count 3: the backward costs two forwards, one for input and one for weight gradients;
    this is issue 8's convention, kept for LoRA students too, whose weight gradients are smaller).

    LCD / LCM-LoRA (methods/lcm.py ``loss``): student forward + backward 3, teacher conditional and
    unconditional (one batched forward of 2B) 2, EMA target (or the LoRA student itself) 1: 6.

    DMD2 (methods/dmd2.py), one step updates one group:
      generator phase (``generator_loss``): G forward + backward 3; fake score at x_t, no grad: 1, or 2
        when ``fake_guidance_scale`` != 1 (cond and uncond); real score (teacher): 2 with CFG
        (``real_guidance_scale`` != 1), else 1. Defaults (1.0, 1.75): 6.
      guidance phase (``guidance_loss``): G forward without grad to make the sample 1, fake score
        forward + backward 3: 4.
    The trainer runs the phases in the method's schedule (1 generator step per ``dfake_gen_update_ratio``
    guidance steps), so a row's figure is the schedule-weighted mean (6 + 10 · 4) / 11 ≈ 4.18 by default.
    The optional GAN head and regression loss add forwards not counted here; rows using them are refused.
    """
    if method == "lcm":
        return 6.0
    if method == "dmd2":
        if mcfg.gan or mcfg.regression_loss_weight > 0 or mcfg.num_denoising_step > 1:
            raise ValueError("forward equivalents are derived for one-step DMD2 without GAN or regression losses")
        if phase == "generator":
            # _guided_x0 runs one forward at guidance scale 1, else cond and uncond (a batch of 2B).
            return 3.0 + (2 if mcfg.fake_guidance_scale != 1.0 else 1) + (2 if mcfg.real_guidance_scale != 1.0 else 1)
        return 4.0
    raise ValueError(f"no forward-equivalent count for method {method!r}")


def phase_fractions(method_obj, horizon: int = 10_000) -> dict[str, float]:
    """Long-run fraction of optimizer steps per phase, from the method's own schedule."""
    counts: dict[str, int] = {}
    for s in range(horizon):
        p = method_obj.phase(s)
        counts[p] = counts.get(p, 0) + 1
    return {p: c / horizon for p, c in counts.items()}


def peak_flops_of(device_name: str) -> float | None:
    for key, flops in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def mfu(fe: float, flops_fwd: float, images_per_s: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: useful UNet FLOPs per second over the device's dense peak."""
    if not peak:
        return None
    return fe * flops_fwd * images_per_s / peak


def summarise(times: list[float], phases: list[str], fractions: dict[str, float], fe_by_phase: dict[str, float],
              batch: int, flops_fwd: float, peak: float | None) -> dict:
    """Per-phase medians, weighted by the schedule: a method with one phase gets its plain median."""
    med = {p: statistics.median([t for t, q in zip(times, phases) if q == p]) for p in fractions}
    s_step = sum(fractions[p] * med[p] for p in fractions)
    fe = sum(fractions[p] * fe_by_phase[p] for p in fractions)
    ips = batch / s_step
    return {"s_per_step": s_step, "images_per_s": ips, "phase_median_s": med, "forward_equivalents": fe,
            "mfu": mfu(fe, flops_fwd, ips, peak)}


# ---- profile summary -----------------------------------------------------------------------------
OPTIMIZER = "optimizer / EMA / grad clipping"
BUCKETS = [  # first match wins; op names are lower-cased. Ops inside Optimizer.step go to OPTIMIZER.
    (OPTIMIZER, r"adam|optimizer|_foreach_|fused_adam|lerp|vector_norm"),
    ("attention (SDPA)", r"scaled_dot_product|flash|efficient_attention|cudnn_attention|softmax|attention"),
    ("convolution", r"conv"),
    ("matmul / linear", r"(^|::|_)(mm|addmm|bmm|baddbmm|matmul|linear|gemm)"),
    ("normalisation", r"group_norm|layer_norm|batch_norm|rms_norm"),
    ("copies / casts / memset", r"copy|memcpy|memset|_to_copy|contiguous|clone"),
    ("compiled (Triton) fused kernels", r"triton"),
    ("views / allocation (no compute)", r"::(view|as_strided|transpose|t|empty|empty_like|empty_strided|reshape|"
                                         r"permute|expand|unsqueeze|squeeze|slice|select|detach|alias|split|chunk|"
                                         r"unbind|narrow|_unsafe_view|resolve_conj|resolve_neg)$"),
]


def bucket_of(name: str, in_optimizer: bool = False) -> str:
    if in_optimizer:
        return OPTIMIZER
    n = name.lower()
    for bucket, pat in BUCKETS:
        if re.search(pat, n):
            return bucket
    return "elementwise / other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        busy += b - max(a, end)
        end = b
    return busy


def profile_summary(prof, wall_s: float, steps: int, on_cuda: bool, title: str, top: int = 25) -> str:
    """Markdown: the top ops by self device time (CPU time without a GPU) and time by bucket."""
    from torch.autograd import DeviceType

    avgs = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]  # ops, not device kernels

    def self_t(e):  # µs
        return e.self_device_time_total if on_cuda else e.self_cpu_time_total

    total = sum(self_t(e) for e in avgs)
    what = "self GPU time" if on_cuda else "self CPU time"
    lines = [f"# Profile: {title}", "",
             f"{steps} steps under torch.profiler ({'CPU + CUDA' if on_cuda else 'CPU'} activities), "
             f"{wall_s / steps:.3f} s/step wall (synchronised). Times are {what} summed over the {steps} steps.", ""]
    buckets: dict[str, float] = {}
    for e in prof.events():  # every op call, so that ops inside the optimizer step count as optimizer time
        if e.device_type != DeviceType.CPU:
            continue
        parent, in_opt = e.cpu_parent, e.name.startswith("Optimizer.")
        while parent is not None and not in_opt:
            in_opt, parent = parent.name.startswith("Optimizer."), parent.cpu_parent
        b = bucket_of(e.name, in_opt)
        buckets[b] = buckets.get(b, 0.0) + self_t(e)
    if on_cuda:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        kernel_total = sum(e.time_range.elapsed_us() for e in kernels)
        busy = _union_us([(e.time_range.start, e.time_range.end) for e in kernels])
        if kernel_total > total:  # device time no CPU op claimed (e.g. launched from outside an op)
            buckets["device time not attributed to an op"] = kernel_total - total
            total = kernel_total
        idle = max(0.0, wall_s * 1e6 - busy)
        buckets["GPU idle between kernels (wall − busy)"] = idle
        total += idle
    lines += [f"## Where the time goes ({'wall time of the GPU' if on_cuda else 'CPU op time'})", "",
              "| bucket | ms/step | share |", "|---|---|---|"]
    for b, us in sorted(buckets.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {b} | {us / 1e3 / steps:.2f} | {100 * us / total:.1f}% |")
    lines += ["", f"## Top {top} ops by {what}", "", "| op | calls/step | ms/step | share | bucket |",
              "|---|---|---|---|---|"]
    for e in sorted(avgs, key=self_t, reverse=True)[:top]:
        name = e.key if len(e.key) <= 70 else e.key[:67] + "..."
        lines.append(f"| `{name}` | {e.count / steps:g} | {self_t(e) / 1e3 / steps:.2f} | "
                     f"{100 * self_t(e) / max(total, 1e-9):.1f}% | {bucket_of(e.key)} |")
    if not on_cuda:
        lines += ["", "Without a GPU there are no kernels to time: op times are CPU times (all threads), and "
                  "GPU idle time cannot be estimated. Run on a GPU for the profile that matters."]
    return "\n".join(lines) + "\n"


# ---- models and data -----------------------------------------------------------------------------
def save_teacher(folder: Path, model: str, tiny: bool, bpe: str | None, device: str) -> Path:
    """The random-weight teacher as a diffusers folder, which `fewstep distill` and `fewstep cache` load."""
    from fewstep import testing

    if model == "sd15":
        parts = testing.tiny_sd_components() if tiny else testing.sd15_components(bpe_gz=bpe, device=device)
        testing.save_sd_pipeline(folder, parts)
    else:
        from diffusers import StableDiffusionXLPipeline

        parts = testing.tiny_sdxl_components() if tiny else testing.sdxl_components(bpe_gz=bpe, device=device)
        StableDiffusionXLPipeline(**parts).save_pretrained(str(folder))
    del parts
    return folder


def common_keys(a, teacher: Path, cuda: bool) -> dict:
    return {"pretrained_teacher_model": str(teacher), "resolution": a.resolution, "train_batch_size": a.batch,
            "mixed_precision": a.mixed_precision, "learning_rate": 1e-6, "lr_warmup_steps": 0,
            "validation_steps": 0, "checkpointing_steps": 10**6, "report_to": "none",
            "dataloader_num_workers": a.workers, "allow_tf32": cuda, "max_train_steps": 10**6}


def row_config(row: Row, common: dict, shards: str, cache: str | None, out: Path) -> dict:
    keys = dict(row.keys)
    if common.get("mixed_precision") == "no":
        # without mixed precision the lever has nothing to cast (and fewstep refuses it as a no-op)
        keys.pop("cast_teacher_unet", None)
    if keys.get("cache_dir") == CACHE:
        keys["cache_dir"] = cache
        data = {}
    else:  # streamed shards, endless (resampled), as the reference's WebDataset loader
        data = {"train_shards_path_or_url": shards, "data_resampling": True}
    lr = {"learning_rate": keys.pop("learning_rate")} if "learning_rate" in keys else {}
    return {**common, **data, **lr, "method": row.method, "output_dir": str(out), **keys}


def write_cache_for(common: dict, shards: str, folder: Path) -> float:
    """`fewstep cache` on the shards (the real writer); returns its wall time in seconds."""
    from accelerate.state import AcceleratorState

    from fewstep.caching import write_cache
    from fewstep.cli import method_configs
    from fewstep.config import resolve

    AcceleratorState._reset_state()
    cfg = {k: v for k, v in common.items() if k not in ("max_train_steps", "learning_rate", "lr_warmup_steps")}
    spec = resolve({**cfg, "method": "lcm", "train_shards_path_or_url": shards, "output_dir": str(folder)},
                   method_configs())
    t0 = time.perf_counter()
    write_cache(spec)
    return time.perf_counter() - t0


# ---- running rows --------------------------------------------------------------------------------
def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()  # compiled graphs hold references to the last row's modules
    except Exception:
        pass


def run_row(row: Row, cfg: dict, a, cuda: bool, flops_fwd: float, peak: float | None, profile_title=None) -> dict:
    from fewstep.cli import method_configs
    from fewstep.config import resolve
    from fewstep.training.trainer import Trainer

    rec = {"label": row.label, "group": row.group, "method": row.method, "keys": row.keys, "setting": row.setting,
           "status": "ok",
           "compile_dropped": bool(row.compile_dropped)}
    warmup = a.compile_warmup if row.compiled else a.warmup
    rec["warmup_steps"] = warmup
    tr = None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        spec = resolve(cfg, method_configs())
        t0 = time.perf_counter()
        tr = Trainer(spec)
        tr.start()
        rec["setup_s"] = time.perf_counter() - t0
        fractions = phase_fractions(tr.method)
        fe_by_phase = {p: forward_equivalents(row.method, spec.method, p) for p in fractions}
        times, phases, first = [], [], None
        from torch._dynamo.utils import counters as dynamo

        dynamo.clear()
        frames_warm = 0
        # Timed steps: at least --steps, and until every phase of the method's schedule has been timed.
        i = 0
        while True:
            ph = tr.method.phase(tr.state.step)
            if i == warmup:
                frames_warm = dynamo["frames"]["total"]
            _sync(cuda)
            t0 = time.perf_counter()
            tr.step()
            _sync(cuda)
            dt = time.perf_counter() - t0
            first = dt if first is None else first
            if i >= warmup:
                times.append(dt)
                phases.append(ph)
            i += 1
            if len(times) >= a.steps and set(fractions) <= set(phases):
                break
            if i > warmup + a.steps + 200:
                raise RuntimeError(f"phases {sorted(set(fractions) - set(phases))} never ran in the timed window")
        rec.update(summarise(times, phases, fractions, fe_by_phase, a.batch, flops_fwd, peak))
        rec.update(first_step_s=first, step_times_s=times, phases=phases, phase_fractions=fractions)
        if row.compiled:
            # What decides whether compilation pays: how many graphs, whether a denoiser call broke into
            # several, and whether anything compiled again once timing started (a guard failing each step).
            rec.update(compiled_frames=dynamo["frames"]["total"], graph_breaks=sum(dynamo["graph_break"].values()),
                       recompiles_timed=dynamo["frames"]["total"] - frames_warm)
        # A timed step far slower than its phase's median: a recompilation (warm-up too short for
        # torch.compile) or a data stall. The median ignores it; the record says it happened.
        slow = [(i, t) for i, (t, q) in enumerate(zip(times, phases)) if t > 3 * rec["phase_median_s"][q]]
        if slow:
            rec["slow_timed_steps"] = slow
            print(f"  note: {len(slow)} timed step(s) over 3x their phase's median (first: step {warmup + slow[0][0]}, "
                  f"{slow[0][1]:.2f} s): recompilation or a data stall", flush=True)
        rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if profile_title:
            rec["profile"] = run_profile(tr, a, cuda, profile_title)
    except (Exception, SystemExit) as e:  # a failed row is a result too (compile unsupported, OOM, ...)
        msg = str(e).strip().splitlines()
        rec.update(status="failed", error=f"{type(e).__name__}: {msg[0] if msg else ''}"[:300])
    finally:
        del tr
        _free(cuda)
    return rec


def run_profile(tr, a, cuda: bool, title: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(cuda)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(a.profile_steps):
            tr.step()
        _sync(cuda)
        wall = time.perf_counter() - t0
    text = profile_summary(prof, wall, a.profile_steps, cuda, title)
    Path(a.profile).parent.mkdir(parents=True, exist_ok=True)
    Path(a.profile).write_text(text)
    return a.profile


# ---- report --------------------------------------------------------------------------------------
def _fmt(x, spec, none="n/a"):
    return none if x is None else format(x, spec)


def keys_text(keys: dict, prev: dict | None = None) -> str:
    """The row's keys; when it extends the previous row of the same method, only what it adds."""
    if prev is not None and all(keys.get(k) == v for k, v in prev["keys"].items()):
        added = {k: v for k, v in keys.items() if k not in prev["keys"]}
        return "+ " + (", ".join(f"{k}={'(cache)' if v == CACHE else v}" for k, v in added.items()) or "nothing")
    return ", ".join(f"{k}={'(cache)' if v == CACHE else v}" for k, v in keys.items()) or "-"


def flops_text(f: float) -> str:
    return f"{f / 1e12:.3f} TFLOP" if f >= 1e10 else f"{f / 1e9:.4f} GFLOP"


def comparable_to_reference(a) -> bool:
    return not a.tiny and a.model == "sd15" and a.resolution == 512 and a.batch == 12


def reference_of(rec: dict, a) -> tuple[float, float] | None:
    if not comparable_to_reference(a) or rec.get("setting") not in ("LCD full", "LCM-LoRA r64"):
        return None
    return REFERENCE[(rec["setting"], bool(rec["keys"].get("gradient_checkpointing", False)))]


def report(results: list[dict], meta: dict, a) -> str:
    lines = ["# fewstep throughput benchmark", "", "Command:", "", f"    {meta['command']}", "",
             f"Device: {meta['device']}; torch {meta['torch']}, diffusers {meta['diffusers']}; {meta['date']}.", "",
             f"Settings: {meta['model_desc']}, {a.resolution} px, batch {a.batch}, mixed precision "
             f"{a.mixed_precision}, {a.workers} data-loader workers, AdamW; median s/step over {a.steps} timed steps "
             f"after {a.warmup} warm-up steps ({a.compile_warmup} for torch.compile rows). UNet forward per sample at "
             f"{meta['latent']}×{meta['latent']} latents: {flops_text(meta['flops_fwd'])} (counted). Peak "
             f"FLOP/s: {_fmt(meta['peak_flops'] and meta['peak_flops'] / 1e12, '.1f')} T.", "",
             f"Data: {meta['n_samples']} synthetic {meta['jpeg_px']} px JPEGs with captions in WebDataset shards "
             f"(written in {meta['shards_s']:.1f} s)"
             + (f"; `fewstep cache` of them written in {meta['cache_s']:.1f} s (not timed in the rows)."
                if meta.get("cache_s") is not None else "."), ""]
    if a.tiny:
        lines += ["**CPU tiny run: these numbers only prove that the script works end to end. They say nothing "
                  "about GPU throughput; the GPU table is pending a session with a GPU (see THROUGHPUT.md).** "
                  f"With {a.steps} timed steps of a few milliseconds on a shared CPU, row-to-row differences "
                  "are mostly noise.", ""]
    lines += ["| row | keys (+ = added to the row above) | s/step | images/s | peak GiB | MFU | × first row of its set | "
              "vs reference (s/step, GiB) | first step s | compiled graphs / breaks / recompiles timed |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results):
        base = next(b for b in results if b["group"] == r["group"] and (b["status"] == "ok" or b is r))
        prev = results[i - 1] if i and results[i - 1]["method"] == r["method"] else None
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {keys_text(r['keys'], prev)} | {r['status']}: {r.get('error', '')} | | | | | | | |")
            continue
        ref = reference_of(r, a)
        vs_ref = "n/a" if ref is None else (f"{ref[0] / r['s_per_step']:.2f}× faster, "
                                            f"{_fmt(r['peak_gib'], '.1f')} vs {ref[1]} GiB")
        lines.append(f"| {r['label']} | {keys_text(r['keys'], prev)} | {r['s_per_step']:.3f} | {r['images_per_s']:.1f} | "
                     f"{_fmt(r['peak_gib'], '.1f')} | {_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}"
                     f"{'%' if r['mfu'] else ''} | {base['s_per_step'] / r['s_per_step']:.2f}× | {vs_ref} | "
                     f"{r['first_step_s']:.2f}{' (slow timed steps: see JSON)' if r.get('slow_timed_steps') else ''} | "
                     + (f"{r['compiled_frames']} / {r['graph_breaks']} / {r['recompiles_timed']} |"
                        if "compiled_frames" in r else "- |"))
    lines += ["", "Forward equivalents per sample: LCD and LCM-LoRA 6; DMD2 the schedule-weighted mean of 6 "
              "(generator step) and 4 (fake-score step), see `forward_equivalents` in the script. MFU uses them, "
              "the counted F_fwd and the dense fp16/bf16 peak. First step: the row's first optimizer step "
              "(compilation, cuDNN autotuning, allocator warm-up), never in the median. Compiled rows: the frames "
              "dynamo compiled (one per denoiser and call pattern), graph breaks inside them, and compilations "
              "during the timed steps (should be 0)."]
    if meta.get("profile"):
        lines += ["", f"Profile of the {'ladder' if any(r['group'] == 'ladder' for r in results) else 'last'} "
                  f"row set's last row: `{meta['profile']}`."]
    return "\n".join(lines) + "\n"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--tiny", action="store_true", help="tiny random model on the CPU: proves the script works")
    p.add_argument("--rows", choices=[*ROW_SETS, "all"], default="ladder")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 30; tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; tiny 1)")
    p.add_argument("--compile_warmup", type=int, default=None,
                   help="untimed steps for torch_compile rows, covering compilation (default 25; tiny 3)")
    p.add_argument("--compile_mode", default="reduce-overhead", help="torch_compile_mode of the all-levers rows")
    p.add_argument("--batch", type=int, default=None, help="per-device batch (default 12; SDXL 4; tiny 2)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512; SDXL 1024; tiny 32)")
    p.add_argument("--mixed_precision", default=None, help="default fp16 on a GPU, no on the CPU")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (tiny default 1: on a shared CPU, more threads than free cores can make "
                        "ops 100x slower while they spin-wait for each other)")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers (default 8; tiny 0)")
    p.add_argument("--bpe", default=None, help="CLIP bpe_simple_vocab_16e6.txt.gz for the real vocabulary")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's dense peak, overriding the table")
    p.add_argument("--profile", default=None, help="after the ladder's last row (else the last row), profile a few "
                                                   "steps into this markdown file")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--out", default=None, help="markdown report; the raw numbers go to the same name .json")
    p.add_argument("--workdir", default=None, help="where the teacher, shards and cache go (default: a temp dir)")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    t = a.tiny
    a.steps = a.steps or (3 if t else 30)
    a.warmup = a.warmup if a.warmup is not None else (1 if t else 10)
    a.compile_warmup = a.compile_warmup if a.compile_warmup is not None else (3 if t else 25)
    a.batch = a.batch or (2 if t else (4 if a.model == "sdxl" else 12))
    a.resolution = a.resolution or (32 if t else (1024 if a.model == "sdxl" else 512))
    a.mixed_precision = a.mixed_precision or ("fp16" if cuda and not t else "no")
    a.workers = a.workers if a.workers is not None else (0 if t else 8)
    a.threads = a.threads or (1 if t else None)
    if a.resolution % 8:
        p.error("--resolution must be a multiple of 8")
    if t and a.bpe:
        p.error("--bpe sets the full-size models' vocabulary; the --tiny models have their own small one: drop --bpe")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    cuda = torch.cuda.is_available()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if cuda else "cpu"
    names = list(ROW_SETS) if a.rows == "all" else [a.rows]
    rows = [dataclasses.replace(r, group=n) for n in names for r in ROW_SETS[n](a.compile_mode)]
    dev_name = torch.cuda.get_device_name() if cuda else "CPU"
    # --peak_tflops also applies without a GPU (e.g. a CPU's own peak); otherwise the CPU's MFU is n/a.
    peak = a.peak_tflops * 1e12 if a.peak_tflops else (peak_flops_of(dev_name) if cuda else None)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="fewstep-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    import diffusers

    t0 = time.perf_counter()
    teacher = save_teacher(work / "teacher", a.model, a.tiny, a.bpe, device)
    _free(cuda)  # the builder's copy must not count in the first row's peak memory
    print(f"random {a.model}{' (tiny)' if a.tiny else ''} teacher written in {time.perf_counter() - t0:.1f} s", flush=True)
    from diffusers import UNet2DConditionModel

    unet_cfg = UNet2DConditionModel.load_config(str(teacher), subfolder="unet")
    tok_cfg = json.loads((teacher / "tokenizer" / "tokenizer_config.json").read_text())
    vae_scale = 2 ** (len(json.loads((teacher / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    latent = a.resolution // vae_scale
    flops_fwd = unet_forward_flops(unet_cfg, latent, int(tok_cfg.get("model_max_length", 77)))
    print(f"UNet forward at {latent}x{latent} latents: {flops_text(flops_fwd)} per sample (counted)", flush=True)

    max_warm = max(a.warmup, a.compile_warmup)
    n = a.batch * (max_warm + a.steps + 12 + a.profile_steps)  # DMD2 rows may run one cycle longer
    jpeg_px = a.resolution + a.resolution // 8  # 576 px for 512 px training, as the reference setup
    (work / "shards").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    shards = write_shards(work / "shards", n, per_shard=48, size=jpeg_px)
    shards_s = time.perf_counter() - t0
    print(f"{n} JPEGs ({jpeg_px} px) in shards written in {shards_s:.1f} s", flush=True)
    common = common_keys(a, teacher, cuda)
    cache, cache_s = None, None
    if any(r.keys.get("cache_dir") == CACHE for r in rows):
        cache = str(work / "cache")
        cache_s = write_cache_for(common, shards, Path(cache))
        _free(cuda)
        print(f"fewstep cache of {n} samples written in {cache_s:.1f} s (not timed)", flush=True)

    results = []
    # Without a GPU, compiled rows use the aot_eager backend (fewstep refuses inductor on the CPU: it
    # computes wrong UNet gradients there, torch 2.13). It traces the same graphs with eager kernels, so
    # the graph, break and recompile counts are real while the times are not compiled times. CUDA-graph
    # modes need inductor: such a row repeats the one before it and is skipped.
    runnable, seen = [], []
    for row in rows:
        if row.compiled and not cuda:
            keys = {k: v for k, v in row.keys.items() if k != "torch_compile_mode"}
            keys["torch_compile_backend"] = "aot_eager"
            row.label, row.keys, row.compile_dropped = row.label + " [no GPU: aot_eager backend]", keys, True
            if (row.method, keys) in seen:
                row.compile_dropped = "duplicate"
        seen.append((row.method, row.keys))
        if row.compile_dropped != "duplicate":
            runnable.append(row)
    # The profile shows the optimised step: the ladder's last row (every lever) when the ladder runs.
    ladder = [r for r in runnable if r.group == "ladder"]
    profiled = (ladder or runnable or [None])[-1]
    for i, row in enumerate(rows):
        if not any(row is r for r in runnable):
            results.append({"label": row.label, "group": row.group, "method": row.method, "keys": row.keys, "setting": row.setting,
                            "status": "skipped", "error": "torch_compile_mode needs the inductor backend, refused "
                            "on the CPU; with aot_eager the row repeats an earlier one"})
            print(f"{row.label:70s} skipped (needs inductor on CUDA; with aot_eager the row repeats another)",
                  flush=True)
            continue
        last = row is profiled
        cfg = row_config(row, common, shards, cache, work / f"out-{i:02d}")
        rec = run_row(row, cfg, a, cuda, flops_fwd, peak,
                      profile_title=f"{row.label} ({dev_name})" if (a.profile and last) else None)
        results.append(rec)
        if rec["status"] == "ok":
            print(f"{row.label:70s} {rec['s_per_step']:.3f} s/step {rec['images_per_s']:7.2f} img/s "
                  f"peak {_fmt(rec['peak_gib'], '.1f')} GiB MFU {_fmt(rec['mfu'] and 100 * rec['mfu'], '.1f')}"
                  f"{'%' if rec['mfu'] else ''}", flush=True)
        else:
            print(f"{row.label:70s} FAILED {rec['error']}", flush=True)

    model_desc = {"sd15": "SD1.5 architecture, random weights", "sdxl": "SDXL architecture, random weights"}[a.model]
    meta = {"command": "python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None
                                                                                    else sys.argv[1:])]),
            "device": dev_name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "model_desc": ("tiny " if a.tiny else "") + model_desc, "latent": latent, "flops_fwd": flops_fwd,
            "peak_flops": peak, "n_samples": n, "jpeg_px": jpeg_px, "shards_s": shards_s, "cache_s": cache_s,
            "profile": a.profile if any(r.get("profile") for r in results) else None,
            "settings": {k: v for k, v in vars(a).items()}}
    text = report(results, meta, a)
    print("\n" + text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
        Path(a.out).with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    return 0  # failed rows are results: the table and the JSON record them


if __name__ == "__main__":
    raise SystemExit(main())
