"""FLUX.1 in fewstep: parameter counts of the full architecture, the memory every method holds per model
family (computed at bf16), and measured seconds per step and peak memory of every method on the CPU.

    python benchmarks/flux.py                       # everything; writes benchmarks/FLUX.md and FLUX.json
    python benchmarks/flux.py --parts counts memory # the computed parts only (seconds, no weights)

1. Counts: FLUX.1-dev / schnell, T5 v1.1 XXL encoder, CLIP ViT-L/14 text and the 16-channel VAE built on the
   meta device from their published configs (``fewstep.testing.flux_components``).
2. Memory: ``fewstep.training.memory.plan`` (what ``--dry_run`` prints) on config-only folders of SD1.5,
   SDXL, SD3-medium and FLUX.1-dev: every network each method builds, at ``--mixed_precision bf16
   --cast_teacher_unet``, with AdamW. Whether one 80 GB GPU holds it under DDP, or how FSDP must shard it.
3. CPU: the real trainer steps on a FLUX.1-dev transformer with FLUX.1's widths but 2 of its 57 blocks (one
   double-stream, one single-stream; 0.55 B of 11.9 B parameters) so that every method fits in this
   machine's memory, at 64 px with a 32-token text sequence, text embeddings from a cache (random, no
   T5/CLIP in memory) and the VAE held. Each method runs in its own process: peak resident memory is that
   process's, next to what ``plan`` predicts for the same configuration.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 2**30
# The CPU configuration: FLUX.1's widths, 1 + 1 of its 19 + 38 blocks.
CPU_LAYERS, CPU_SINGLE, CPU_RES, CPU_TOKENS, CPU_STEPS = 1, 1, 64, 32, 2


# ---- config-only folders (no weights: what --dry_run reads) ---------------------------------------------
def write_config_folder(out: Path, pipeline_class: str, parts: dict, tokenizers: dict | None = None) -> Path:
    """model_index.json and each part's config (models built on the meta device), plus tokenizers."""
    out.mkdir(parents=True, exist_ok=True)
    import diffusers

    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__}
    for name, part in parts.items():
        if part is None:
            index[name] = [None, None]
            continue
        lib = "diffusers" if type(part).__module__.startswith("diffusers") else "transformers"
        index[name] = [lib, type(part).__name__]
        if lib == "diffusers":
            part.save_config(str(out / name))
        else:
            part.config.save_pretrained(str(out / name))
    for name, tok in (tokenizers or {}).items():
        index[name] = ["transformers", type(tok).__name__]
        tok.save_pretrained(str(out / name))
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    return out


def family_folders(root: Path) -> dict[str, Path]:
    """Config-only folders of each family's reference architecture."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    from fewstep.testing import flux_components, sd15_components, sdxl_components, write_clip_tokenizer

    out = {}
    p = sd15_components(device="meta")
    out["SD1.5"] = write_config_folder(root / "sd15", "StableDiffusionPipeline",
                                       {k: p[k] for k in ("unet", "vae", "text_encoder", "scheduler")},
                                       {"tokenizer": p["tokenizer"]})
    p = sdxl_components(device="meta")
    out["SDXL"] = write_config_folder(root / "sdxl", "StableDiffusionXLPipeline",
                                      {k: p[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")},
                                      {"tokenizer": p["tokenizer"], "tokenizer_2": p["tokenizer_2"]})
    # SD3-medium, from its published configs: MMDiT 24 × 64 heads·width, CLIP-L + CLIP-bigG, T5-XXL, 16-ch VAE
    with torch.device("meta"):
        def clip(hidden, layers, heads):
            return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=hidden,
                                                              intermediate_size=4 * hidden, num_hidden_layers=layers,
                                                              num_attention_heads=heads, projection_dim=hidden,
                                                              max_position_embeddings=77, hidden_act="gelu"))
        sd3 = {"transformer": SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                                    attention_head_dim=64, num_attention_heads=24,
                                                    joint_attention_dim=4096, caption_projection_dim=1536,
                                                    pooled_projection_dim=2048, out_channels=16,
                                                    pos_embed_max_size=192),
               "vae": AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4,
                                    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                                    layers_per_block=2, latent_channels=16, sample_size=1024, scaling_factor=1.5305,
                                    shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
               "text_encoder": clip(768, 12, 12), "text_encoder_2": clip(1280, 32, 20),
               "text_encoder_3": T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                                         num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                                                         is_encoder_decoder=False)),
               "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}
    with tempfile.TemporaryDirectory() as tmp:
        tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp, None, 77)))
    from transformers import T5TokenizerFast

    from fewstep.testing import write_t5_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        t5 = T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(tmp)))
    out["SD3-medium"] = write_config_folder(root / "sd3", "StableDiffusion3Pipeline", sd3,
                                            {"tokenizer": tok, "tokenizer_2": tok, "tokenizer_3": t5})
    p = flux_components("dev", device="meta")
    out["FLUX.1-dev"] = write_config_folder(root / "flux", "FluxPipeline", p,
                                            {"tokenizer": tok, "tokenizer_2": t5})
    return out


# ---- 1. counts ---------------------------------------------------------------------------------------------
def counts() -> dict:
    from fewstep.testing import flux_components

    dev, schnell = flux_components("dev"), flux_components("schnell")

    def n(m):
        return sum(p.numel() for p in m.parameters())

    return {"FLUX.1-dev transformer": n(dev["transformer"]), "FLUX.1-schnell transformer": n(schnell["transformer"]),
            "T5 v1.1 XXL encoder (text_encoder_2)": n(dev["text_encoder_2"]),
            "CLIP ViT-L/14 text (text_encoder)": n(dev["text_encoder"]), "VAE (16 channels)": n(dev["vae"])}


# ---- 2. memory per method and family (computed) -------------------------------------------------------------
METHODS = {
    "LCD (full)": dict(method="lcm"),
    "LCM-LoRA r64": dict(method="lcm", lora_rank=64),
    "DMD2 (full fake score)": dict(method="dmd2"),
    "DMD2, LoRA fake score r64": dict(method="dmd2", fake_score_lora_rank=64),
    "DisBack (full path points)": dict(method="disback"),
    "DisBack, LoRA fake score r64": dict(method="disback", fake_score_lora_rank=64),
    "direct (full)": dict(method="direct"),
    "direct, LoRA r32": dict(method="direct", lora_rank=32),
}
GPU_BYTES = 80 * 10**9  # an 80 GB H100 / A100
HEADROOM = 16 * 10**9  # left for activations, the CUDA context and allocator slack


def _args(teacher, data, out, **kw):
    base = dict(pretrained_teacher_model=teacher, train_data_dir=data, output_dir=out, resolution=1024,
                train_batch_size=1, report_to="none", mixed_precision="bf16", cast_teacher_unet=True)
    base.update(kw)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def setting(frozen: int, trained: int) -> str:
    """DDP when one GPU holds everything with headroom; else FSDP sharding the trained networks (with their
    gradients and optimizer states) over N GPUs; the frozen ones are held whole on every GPU."""
    budget = GPU_BYTES - HEADROOM
    if frozen + trained <= budget:
        return "DDP"
    if frozen >= budget:
        return f"does not fit 80 GB: frozen networks alone {frozen / GIB:.0f} GiB"
    return f"FSDP, ≥ {math.ceil(trained / (budget - frozen))} GPUs"


def memory(root: Path, data: Path) -> list[dict]:
    from fewstep.cli import parse_run
    from fewstep.models.bundle import family_of
    from fewstep.training.memory import plan

    rows = []
    for family, folder in family_folders(root).items():
        text_parts = set(family_of(str(folder)).text_parts)
        for label, kw in METHODS.items():
            extra = dict(degradation_steps=1, max_train_steps=2) if kw["method"] == "disback" else {}
            spec = parse_run(_args(folder, data, root / "out", **kw, **extra))
            p = plan(spec)
            text = sum(h.bytes for h in p.networks if h.name in text_parts)
            trained_nets = sum(h.bytes for h in p.networks if h.trainable)
            trained = trained_nets + p.grad_bytes + p.optimizer_bytes
            # direct distillation reads `fewstep generate` rows and encodes their prompts: no cache, so it
            # holds the text encoders; the others can train from a cache without them
            cache = kw["method"] != "direct"
            frozen = p.weight_bytes - trained_nets - (text if cache else 0)
            rows.append({"family": family, "method": label, "trained_params": p.trainable,
                         "weights_gib": p.weight_bytes / GIB, "grads_gib": p.grad_bytes / GIB,
                         "adam_gib": p.optimizer_bytes / GIB, "text_encoders_gib": text / GIB,
                         "total_gib": p.total_bytes / GIB,
                         "from_cache_gib": (p.total_bytes - text) / GIB if cache else None,
                         "setting": setting(frozen, trained),
                         "networks": {h.name: [h.params, h.bytes, h.trainable] for h in p.networks}})
    return rows


# ---- 3. CPU: measured -----------------------------------------------------------------------------------------
CPU_METHODS = {
    "LCD (full)": dict(method="lcm", w_min=1.5, w_max=3.5),
    "LCM-LoRA r16": dict(method="lcm", lora_rank=16, w_min=1.5, w_max=3.5),
    "DMD2 + GAN, LoRA fake score r16": dict(method="dmd2", fake_score_lora_rank=16, dfake_gen_update_ratio=1,
                                            real_guidance_scale=3.5, gen_cls_loss_weight=5e-3,
                                            guidance_cls_loss_weight=1e-2),
    "DMD2 (full fake score)": dict(method="dmd2", dfake_gen_update_ratio=1, real_guidance_scale=3.5),
    "DisBack, LoRA fake score r16": dict(method="disback", fake_score_lora_rank=16, dfake_gen_update_ratio=1,
                                         degradation_steps=2, degradation_interval=1, interval=1,
                                         real_guidance_scale=3.5),
    "direct (full), K=2": dict(method="direct"),
    "direct, LoRA r16, K=2": dict(method="direct", lora_rank=16),
}


def _peak() -> int:
    """This process's peak resident memory (VmHWM: unlike getrusage's maxrss, not inherited from the parent
    across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_data(work: Path) -> tuple[Path, Path, Path]:
    """A config-only FLUX.1-dev folder at the CPU depth, 64 px caption images, and direct-distillation rows."""
    import torch
    from safetensors.torch import save_file

    from fewstep.testing import DIGIT_WORDS, FLUX_SCHEDULERS, flux_components, write_caption_folder

    p = flux_components("dev", device="meta", num_layers=CPU_LAYERS, num_single_layers=CPU_SINGLE)
    from diffusers import FlowMatchEulerDiscreteScheduler

    p["scheduler"] = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS["dev"])
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import CLIPTokenizer, T5TokenizerFast

        from fewstep.testing import write_clip_tokenizer, write_t5_tokenizer

        toks = {"tokenizer": CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tmp) / "c", None, 77))),
                "tokenizer_2": T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(Path(tmp) / "t")))}
    folder = write_config_folder(work / "teacher", "FluxPipeline", p, toks)
    (folder / "fewstep_sampling.json").write_text(json.dumps({"pipeline_kwargs": {"max_sequence_length": CPU_TOKENS}}))
    images = write_caption_folder(work / "images", n=8, size=CPU_RES)
    rows = work / "rows"
    (rows / "latents").mkdir(parents=True, exist_ok=True)
    lines = ["image,prompt,seed,rand_device,num_inference_steps,cfg_scale,latents"]
    for i in range(8):
        img = sorted(images.glob("*.png"))[i]
        save_file({"latents": torch.randn(16, CPU_RES // 8, CPU_RES // 8)}, str(rows / "latents" / f"{i}.safetensors"))
        os.link(img, rows / img.name) if not (rows / img.name).exists() else None
        lines.append(f"{img.name},a handwritten digit {DIGIT_WORDS[i % 10]},{i},cpu,2,3.5,latents/{i}.safetensors")
    (rows / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder, images, rows


def child(label: str, work: Path) -> dict:
    """One method's steps in this process (run by the parent in a fresh process per method)."""
    import torch

    torch.set_num_threads(1)  # the machine is shared: one thread, no OpenMP spinning
    base = _peak()
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from fewstep.cli import parse_run
    from fewstep.models.bundle import load_bundle
    from fewstep.testing import DIGIT_WORDS
    from fewstep.training.memory import plan
    from fewstep.training.trainer import Trainer

    kw = CPU_METHODS[label]
    data = work / ("rows" if kw["method"] == "direct" else "images")
    steps = 1 + CPU_STEPS + (2 if kw["method"] == "disback" else 0)
    args = _args(work / "teacher", data, work / "out", resolution=CPU_RES, train_batch_size=1, max_train_steps=steps,
                 validation_steps=0, checkpointing_steps=1000, learning_rate=1e-5, lr_warmup_steps=0, **kw)
    spec = parse_run(args)
    planned = plan(spec, text_encoders=False)  # as the run below holds none
    bundle = load_bundle(str(work / "teacher"), weights=False)
    torch.manual_seed(0)
    bundle.parts = {"transformer": FluxTransformer2DModel.from_config(bundle.parts["transformer"]),
                    "vae": AutoencoderKL.from_config(bundle.parts["vae"]), "text_encoder": None,
                    "text_encoder_2": None}
    bundle.freeze()
    # text from a cache: the T5 sequence (CPU_TOKENS × 4096) and CLIP's pooled output (768) per prompt
    g = torch.Generator().manual_seed(0)
    prompts = ["", *[f"a handwritten digit {w}" for w in DIGIT_WORDS]]
    bundle.text_cache = {p: {"encoder_hidden_states": torch.randn(1, CPU_TOKENS, 4096, generator=g),
                             "pooled_projections": torch.randn(1, 768, generator=g)} for p in prompts}
    built = _peak()
    tr = Trainer(spec, bundle=bundle)
    tr.start()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        logs = tr.step()
        times.append(time.perf_counter() - t0)
        losses.append(logs.get("loss"))
    return {"method": label, "peak_rss_gib": _peak() / GIB, "baseline_rss_gib": base / GIB,
            "after_models_rss_gib": built / GIB, "planned_gib": planned.total_bytes / GIB,
            "planned_networks": {h.name: [h.params, h.bytes] for h in planned.networks},
            "transformer_params": sum(p.numel() for p in bundle.denoiser.parameters()),
            "step_seconds": times, "losses": losses, "timed_steps": times[-CPU_STEPS:]}


def cpu(work: Path, budget: float) -> list[dict]:
    """Every method in its own process, until ``budget`` seconds have passed (a shared machine: a method
    not started, or stopped, within it is recorded as such, not left out)."""
    from fewstep.cli import parse_run
    from fewstep.training.memory import plan

    t_start = time.time()
    cpu_data(work)
    rows = []
    for label, kw in CPU_METHODS.items():
        left = budget - (time.time() - t_start)
        if left < 30:
            rows.append({"method": label, "skipped": f"not run: the {budget:.0f} s time budget was spent"})
            continue
        data = work / ("rows" if kw["method"] == "direct" else "images")
        extra = dict(degradation_steps=2, max_train_steps=6) if kw["method"] == "disback" else {}
        spec = parse_run(_args(work / "teacher", data, work / "out", resolution=CPU_RES, **{**kw, **extra}))
        need, free = plan(spec, text_encoders=False).total_bytes, _available()
        if need + 3 * GIB > free:  # this machine is shared: leave the others room
            rows.append({"method": label, "skipped": f"needs {need / GIB:.1f} GiB + activations, "
                                                     f"{free / GIB:.1f} GiB available"})
            continue
        res = work / f"{len(rows)}.json"
        killed = []
        for _attempt in range(2):  # once more if the kernel killed it (other jobs' memory), time allowing
            t0 = time.time()
            left = budget - (t0 - t_start)
            try:
                proc = subprocess.run([sys.executable, __file__, "--child", label, "--work", str(work), "--result",
                                       str(res)], capture_output=True, text=True, timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                proc = None
                break
            if proc.returncode >= 0 or left - (time.time() - t0) < 60:
                break
            killed.append(-proc.returncode)
        if proc is None:
            rows.append({"method": label, "skipped": f"stopped after {left:.0f} s: the time budget was spent"})
            continue
        if proc.returncode:
            why = (f"killed by signal {-proc.returncode} (SIGKILL: the kernel's out-of-memory killer on a machine "
                   "shared with other jobs)" if proc.returncode == -9 else proc.stderr[-2000:])
            rows.append({"method": label, "failed": why})
            continue
        row = json.loads(res.read_text())
        row["process_seconds"] = time.time() - t0
        if killed:
            row["killed_before"] = killed  # the first attempt was killed by that signal; this is the retry
        rows.append(row)
        print(f"{label}: {row['timed_steps']} s/step, peak {row['peak_rss_gib']:.2f} GiB", flush=True)
    return rows


# ---- report -----------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    out = ["# FLUX.1 in fewstep: parameters, memory per method, CPU steps\n",
           f"Command: `{result['command']}`  \nDevice: {result['device']}  \nDate: {result['date']}  \n"
           f"Wall time: {result['seconds']:.0f} s (machine shared with other jobs)\n"]
    if "counts" in result:
        out += ["## Parameters (full architectures on the meta device)\n", "| network | parameters |", "|---|---:|"]
        out += [f"| {k} | {v:,} ({v / 1e9:.3f} B) |" for k, v in result["counts"].items()]
        out += ["", "Published: FLUX.1 is a \"12 billion parameter rectified flow transformer\" (Black Forest Labs); "
                "its bf16 checkpoint (`transformer/*.safetensors` of FLUX.1-dev) is 23.8 GB = 11.9 B × 2 bytes. "
                "The T5 v1.1 XXL encoder's bf16 weights are 9.52 GB = 4.76 B × 2 bytes.\n"]
    if "memory" in result:
        out += ["## Memory each method holds (computed, bf16)\n",
                "`fewstep.training.memory.plan` (what `--dry_run` prints): the method built on the meta device at "
                "`--mixed_precision bf16 --cast_teacher_unet`: trained networks fp32 with fp32 gradients and AdamW's "
                "two fp32 moments; frozen ones bf16 (SDXL's VAE stays fp32). Activations are not included. "
                f"Setting: DDP when everything fits one 80 GB GPU with {HEADROOM // 10**9} GB left for activations; "
                "else FSDP sharding the trained networks (weights, gradients, AdamW states) over N GPUs, the frozen "
                "ones held whole on each (from a cache where the method can use one; direct distillation "
                "encodes its rows' prompts, so it holds the text encoders).\n",
                "| family | method | trained params | weights GiB | grads + AdamW GiB | text encoders GiB | total GiB "
                "| from a cache GiB | multi-GPU |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in result["memory"]:
            out.append(f"| {r['family']} | {r['method']} | {r['trained_params'] / 1e9:.3f} B | {r['weights_gib']:.1f} | "
                       f"{r['grads_gib'] + r['adam_gib']:.1f} | {r['text_encoders_gib']:.1f} | {r['total_gib']:.1f} | "
                       f"{'–' if r['from_cache_gib'] is None else format(r['from_cache_gib'], '.1f')} | "
                       f"{r['setting']} |")
        out.append("")
    if "cpu" in result:
        c = result["cpu_config"]
        out += ["## Measured on the CPU\n",
                f"FLUX.1-dev's transformer with FLUX.1's widths but {c['num_layers']} double-stream and "
                f"{c['num_single_layers']} single-stream block (of 19 + 38: a {c['reduction']}× smaller block count; "
                f"{c['transformer_params'] / 1e9:.3f} B of 11.901 B parameters), random weights, so that every method "
                f"fits this machine's {c['machine_gib']:.0f} GiB shared with other jobs; {c['resolution']} px "
                f"({c['resolution'] // 16}² image tokens), a {c['tokens']}-token T5 sequence, batch 1, "
                "`--mixed_precision bf16 --cast_teacher_unet`, text embeddings from a cache (T5 and CLIP not held), "
                "the VAE held. One process per method; peak resident memory includes Python, torch and the VAE; "
                f"'planned' is `plan` for the same run. Seconds per step: the last {CPU_STEPS} optimizer steps "
                "(DMD2/DisBack alternate generator and fake-score steps), on 1 CPU thread of a machine shared "
                "with other jobs.\n",
                "| method | s/step (each) | peak RSS GiB | RSS after models built GiB | planned GiB |",
                "|---|---|---:|---:|---:|"]
        for r in result["cpu"]:
            if "skipped" in r or "failed" in r:
                out.append(f"| {r['method']} | {r.get('skipped') or 'failed: ' + (r['failed'].strip().splitlines() or ['?'])[-1]} | | | |")
                continue
            again = " (retried: the first run was killed)" if r.get("killed_before") else ""
            out.append(f"| {r['method']}{again} | {', '.join(f'{t:.1f}' for t in r['timed_steps'])} | "
                       f"{r['peak_rss_gib']:.2f} | {r['after_models_rss_gib']:.2f} | {r['planned_gib']:.2f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["counts", "memory", "cpu"], choices=["counts", "memory", "cpu"])
    ap.add_argument("--out", default=str(HERE / "FLUX.md"))
    ap.add_argument("--budget", type=float, default=720, help="seconds for the CPU part (all methods)")
    ap.add_argument("--child", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--result", default=None)
    a = ap.parse_args()
    if a.child:
        Path(a.result).write_text(json.dumps(child(a.child, Path(a.work))))
        return
    t0 = time.time()
    result = {"command": "python benchmarks/flux.py" + ("" if a.parts == ["counts", "memory", "cpu"]
                                                        else " --parts " + " ".join(a.parts))
                         + ("" if a.budget == 720 else f" --budget {a.budget:g}"),
              "device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores "
                        f"(shared), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB",
              "date": datetime.date.today().isoformat()}
    with tempfile.TemporaryDirectory(prefix="fewstep-flux-bench-") as tmp:
        work = Path(tmp)
        if "counts" in a.parts:
            result["counts"] = counts()
        if "memory" in a.parts:
            from fewstep.testing import write_caption_folder

            result["memory"] = memory(work / "families", write_caption_folder(work / "data", n=2, size=64))
        if "cpu" in a.parts:
            result["cpu"] = cpu(work / "cpu", a.budget)
            ok = [r for r in result["cpu"] if "transformer_params" in r]
            result["cpu_config"] = {"num_layers": CPU_LAYERS, "num_single_layers": CPU_SINGLE, "resolution": CPU_RES,
                                    "tokens": CPU_TOKENS, "reduction": round(57 / (CPU_LAYERS + CPU_SINGLE), 1),
                                    "transformer_params": ok[0]["transformer_params"] if ok else 0,
                                    "machine_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB}
    result["seconds"] = time.time() - t0
    Path(a.out).write_text(markdown(result))
    Path(a.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
