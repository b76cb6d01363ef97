"""Qwen-Image: parameter counts of the full architecture, and peak memory and seconds per step of every
method (direct full and LoRA, LCD, LCM-LoRA, DMD2, DisBack) on the CPU with the transformer cut to a few
of its blocks.

1. Counts, on the meta device (shapes only, nothing allocated): the QwenImageTransformer2DModel of the
   released model (diffusers' defaults: 60 dual-stream blocks of width 3072, text width 3584), the
   AutoencoderKLQwenImage, the Qwen2.5-VL-7B-Instruct text encoder (language model + vision tower), and
   the LoRA of DiffSynth's Qwen-Image-Distill-LoRA recipe (rank 32 on its 12 modules per block); from
   them, the memory each method needs at bf16 (the table of the README).
2. Runs: each row is a fresh process (its peak resident memory is the row's alone) running the real
   `fewstep distill` step (data loading, VAE encoding, the method's loss, backward, AdamW) through
   `Trainer`, on the real architecture's widths with ``--layers`` of the 60 blocks, random weights, at
   ``--resolution`` px, batch 1, fp32 (the CPU has no fast bf16). The text encoder is not held: the
   prompt embeddings (3584 wide, padded to 512 tokens with their mask) are served as a `fewstep cache`
   serves them; the VAE is the full one.

Each row's result is recorded in ``qwenimage_rows.json`` with its date, threads and settings, so a run of
some rows (``--rows``) keeps the others' results; QWENIMAGE.md is written from all recorded rows.

    python benchmarks/qwenimage.py                      # counts + every CPU row, writes QWENIMAGE.md
    python benchmarks/qwenimage.py --rows "DMD2, 1-step generator, LoRA r32 fake score"
    python benchmarks/qwenimage.py --counts_only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30
ROWS = {
    # label: (method options, learning rate)
    "direct, full transformer": (dict(method="direct"), 1e-5),
    "direct, LoRA r32 (DiffSynth's targets)": (dict(method="direct", lora_rank=32), 1e-4),
    "LCD, full transformer (EMA target)": (dict(method="lcm"), 1e-6),
    "LCM-LoRA r32 (+ EMA adapter)": (dict(method="lcm", lora_rank=32, ema_decay=0.95), 1e-4),
    # DMD2 / DisBack: one generator and one fake-score update per step (--dfake_gen_update_ratio 1)
    "DMD2, 1-step generator, LoRA r32 fake score": (
        dict(method="dmd2", fake_score_lora_rank=32, dfake_gen_update_ratio=1), 2e-6),
    "DMD2, 1-step generator, full fake score": (dict(method="dmd2", dfake_gen_update_ratio=1), 2e-6),
    # (the warm-up step is DisBack's one degradation step; the timed ones backtrack)
    "DisBack, LoRA r32 fake score": (
        dict(method="disback", fake_score_lora_rank=32, dfake_gen_update_ratio=1, degradation_steps=1,
             degradation_interval=1, interval=1), 2e-6),
}
RECORD = Path(__file__).with_name("qwenimage_rows.json")
PROMPT = "a photo of a red cat sitting on a wooden table next to a window in soft morning light"


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(transformer, rank: int, targets: list[str]) -> int:
    """Parameters of rank-``rank`` LoRA adapters on the Linear layers peft would match (name equal to a
    target or ending in "." + target): r · (in + out) each."""
    import torch

    total = 0
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (m.in_features + m.out_features)
    return total


def counts() -> dict:
    from fewstep.models.qwenimage import QWEN_LORA_TARGETS
    from fewstep.testing import qwenimage_components

    parts = qwenimage_components(device="meta")
    tr, vae, te = parts["transformer"], parts["vae"], parts["text_encoder"]
    block = n_params(tr.transformer_blocks[0])
    return {"transformer": n_params(tr), "transformer_block": block, "transformer_blocks": len(tr.transformer_blocks),
            "vae": n_params(vae), "text_encoder": n_params(te), "text_encoder_vision": n_params(te.model.visual),
            "text_encoder_lm_head": n_params(te.lm_head),
            "lora_r32": lora_params(tr, 32, QWEN_LORA_TARGETS)}


def memory_table(c: dict) -> list[tuple[str, float, str]]:
    """GB each method holds at bf16 (frozen networks 2 B/param; trained weights fp32 master + fp32 grads +
    AdamW's two fp32 moments = 16 B/param; LoRA adapters likewise), activations not included; the text
    encoder is held only by direct distillation (the others train from `fewstep cache`)."""
    T, E, V, L = c["transformer"], c["text_encoder"], c["vae"], c["lora_r32"]
    gb = 1e9
    rows = [
        ("direct, full", 16 * T + 2 * E + 2 * V, "FSDP (FULL_SHARD) or DeepSpeed ZeRO-3 / ZeRO-2 with offload"),
        ("direct, LoRA r32", 2 * T + 16 * L + 2 * E + 2 * V, "one 80 GB GPU; DDP"),
        ("LCD, full (teacher bf16, EMA target fp32)", 2 * T + 16 * T + 4 * T + 2 * V, "FSDP"),
        ("LCM-LoRA r32 (+ EMA adapter)", 2 * T + 16 * L + 4 * L + 2 * V, "one 80 GB GPU; DDP"),
        ("DMD2, full fake score (teacher bf16)", 2 * T + 16 * T + 16 * T + 2 * V, "FSDP"),
        ("DMD2, LoRA r32 fake score", 2 * T + 16 * T + 16 * L + 2 * V, "FSDP"),
        ("DisBack, LoRA r32 fake score (+ target adapter)", 2 * T + 16 * T + 16 * L + 4 * L + 2 * V, "FSDP"),
    ]
    return [(label, b / gb, setting) for label, b, setting in rows]


# ---- one CPU row, in its own process ------------------------------------------------------------

def child(label: str, layers: int, res: int, steps: int, tmp: Path) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from PIL import Image

    from fewstep.cli import method_configs
    from fewstep.config import resolve
    from fewstep.models.qwenimage import QwenImageBundle
    from fewstep.testing import QWEN_IMAGE_SCHEDULER
    from fewstep.training.trainer import Trainer

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(num_layers=layers)
    vae = AutoencoderKLQwenImage()
    sched = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    sched_cfg = {**sched.config, "_class_name": type(sched).__name__}
    bundle = QwenImageBundle(str(tmp), {"transformer": transformer, "vae": vae, "text_encoder": None, "tokenizer": None,
                                        "scheduler": sched}, sched_cfg)
    bundle.freeze()
    # Prompt embeddings as a cache holds them: 3584 wide, the prompt's tokens valid, padded to 512.
    n_tok = 24
    text = {}
    for p in ("", PROMPT):
        e = torch.zeros(1, 512, 3584)
        m = torch.zeros(1, 512)
        k = 5 if p == "" else n_tok
        e[:, :k] = torch.randn(1, k, 3584)
        m[:, :k] = 1
        text[p] = {"encoder_hidden_states": e, "encoder_hidden_states_mask": m}
    bundle.text_cache = text

    opts, lr = ROWS[label]
    rng = np.random.default_rng(0)
    data = tmp / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(data / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{PROMPT},{i},cpu,2,1.0")
        (data / "images" / f"{i}.txt").write_text(PROMPT)
    if opts["method"] == "direct":  # DiffSynth's rows: the student samples 2 steps at CFG 1
        (data / "metadata.csv").write_text("image,prompt,seed,rand_device,num_inference_steps,cfg_scale\n"
                                           + "\n".join(rows) + "\n")
        train_dir = data
    else:
        train_dir = data / "images"
    cfg = {"pretrained_teacher_model": str(tmp), "train_data_dir": str(train_dir), "output_dir": str(tmp / "out"),
           "resolution": res, "train_batch_size": 1, "mixed_precision": "no", "max_train_steps": steps + 1,
           "gradient_checkpointing": True, "learning_rate": lr, "lr_warmup_steps": 0, "validation_steps": 0,
           "checkpointing_steps": 10**6, "report_to": "none", "dataloader_num_workers": 0, **opts}
    base_params = n_params(transformer)  # (before a method attaches LoRA adapters to it)
    tr = Trainer(resolve(cfg, method_configs()), bundle=bundle)
    tr.start()
    trainable = sum(p.numel() for ps in tr.params.values() for p in ps)
    tr.step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tr.step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"label": label, "s_per_step": statistics.median(times), "peak_rss_gib": peak / GiB,
            "transformer_params": base_params, "trainable_params": trainable,
            "threads": torch.get_num_threads(), "layers": layers, "resolution": res, "steps": steps,
            "date": datetime.date.today().isoformat()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=1, help="transformer blocks kept of the 60")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--counts_only", action="store_true")
    p.add_argument("--rows", nargs="*", default=None, choices=list(ROWS),
                   help="run only these rows (default: all); the others keep their recorded results")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per row (1 on a machine shared with other jobs)")
    p.add_argument("--out", default=str(Path(__file__).with_name("QWENIMAGE.md")))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        with tempfile.TemporaryDirectory(prefix="fewstep-qwen-bench-") as tmp:
            print("RESULT " + json.dumps(child(a.child, a.layers, a.resolution, a.steps, Path(tmp))), flush=True)
        return 0
    c = counts()
    print(json.dumps(c, indent=1), flush=True)
    recorded = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    if not a.counts_only:
        for label in a.rows if a.rows is not None else ROWS:
            cmd = [sys.executable, __file__, "--child", label, "--layers", str(a.layers), "--resolution",
                   str(a.resolution), "--steps", str(a.steps), "--threads", str(a.threads)]
            t_row = time.time()
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                return 1
            r = json.loads(line[0][len("RESULT "):])
            recorded[label] = {**r, "row_seconds": time.time() - t_row}
            print(r, flush=True)
            RECORD.write_text(json.dumps(recorded, indent=1) + "\n")  # each row as soon as it is measured
    results = [recorded[label] for label in ROWS if label in recorded]
    write_report(Path(a.out), c, results, a)
    return 0


def write_report(path: Path, c: dict, results: list[dict], a) -> None:
    import diffusers
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else "?"
    B = 1e9
    row_s = sum(r.get("row_seconds", 0.0) for r in results)
    cmd = "python benchmarks/qwenimage.py" + ("" if a.layers == 1 else f" --layers {a.layers}") + \
        ("" if a.resolution == 128 else f" --resolution {a.resolution}") + ("" if a.steps == 2 else f" --steps {a.steps}")
    lines = [
        "# Qwen-Image: parameters, memory per method, CPU step cost", "",
        f"Command: `{cmd}` (last run {datetime.date.today().isoformat()}; {cpu}, a machine shared with other "
        f"jobs; torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
        f"{transformers.__version__}; the CPU rows took {row_s / 60:.1f} min in all, one process each). Each row "
        "was measured on the date and with the torch threads it gives (`--rows` reruns some; "
        "qwenimage_rows.json keeps the rest).", "",
        "## Parameters (meta device, the released architecture)", "",
        "| network | parameters | published |", "|---|---|---|",
        f"| QwenImageTransformer2DModel ({c['transformer_blocks']} blocks, {c['transformer_block'] / B:.3f} B each) "
        f"| {c['transformer'] / B:.2f} B | 20 B (\"a 20B MMDiT\", Qwen-Image report) |",
        f"| Qwen2.5-VL-7B-Instruct text encoder (vision tower {c['text_encoder_vision'] / B:.2f} B, "
        f"LM head {c['text_encoder_lm_head'] / B:.2f} B, both unused by the pipeline) | {c['text_encoder'] / B:.2f} B "
        "| 8.29 B (its model page; \"7B\" in the name) |",
        f"| AutoencoderKLQwenImage | {c['vae'] / 1e6:.1f} M | |",
        f"| LoRA r32 on DiffSynth's Qwen-Image-Distill-LoRA modules | {c['lora_r32'] / 1e6:.1f} M | |", "",
        "## Memory each method holds at bf16 (computed from the counts; activations not included)", "",
        "Frozen networks in bf16 (2 B/param; `--mixed_precision bf16`, `--cast_teacher_unet` for LCD/DMD2's "
        "teacher); trained weights as fp32 masters with fp32 gradients and AdamW moments (16 B/param). Every "
        "method but direct distillation trains from `fewstep cache` (no text encoder; direct holds it: "
        f"{2 * c['text_encoder'] / B:.1f} GB).", "",
        "| method | GB | multi-GPU setting |", "|---|---|---|",
    ]
    lines += [f"| {label} | {gb:.0f} | {setting} |" for label, gb, setting in memory_table(c)]
    if results:
        r0 = results[0]
        frac = r0["transformer_params"] / c["transformer"]
        lines += [
            "", f"## CPU: {a.layers} of the 60 blocks, {a.resolution} px, batch 1, fp32", "",
            f"The transformer keeps {a.layers} of its 60 blocks ({r0['transformer_params'] / B:.2f} B parameters, "
            f"{100 * frac:.1f} % of {c['transformer'] / B:.1f} B: 60 blocks cannot be trained in this machine's "
            "24 GiB, as the table above shows); widths, the VAE and the prompt embeddings are the real ones. "
            "Peak = the process's peak resident memory; s/step = median of the timed steps after a warm-up "
            "(one generator and one fake-score update per step for DMD2 and DisBack).", "",
            "| row | trainable parameters | s/step | peak resident memory | threads | timed steps | measured |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {r['label']} | {r['trainable_params'] / 1e6:.1f} M | {r['s_per_step']:.1f} | "
                  f"{r['peak_rss_gib']:.1f} GiB | {r['threads']} | {r['steps']} | {r['date']} |" for r in results]
    path.write_text("\n".join(lines) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    raise SystemExit(main())
