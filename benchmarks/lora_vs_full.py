"""Peak memory and step time of LCD full vs LCM-LoRA on the SD1.5 architecture (random weights).

Same batch, resolution and precision for every row; gradient checkpointing on and off. Each row is a
fresh model and a fresh `Trainer` running the real `fewstep distill` step (data loading, VAE and
text encoding included). Median step time over the steps after warm-up; peak = torch's max allocated.

    python benchmarks/lora_vs_full.py                     # GPU: SD1.5 at 512 px, batch 12, fp16
    python benchmarks/lora_vs_full.py --tiny              # CPU: tiny model, for a quick check
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewstep.cli import method_configs
from fewstep.config import resolve
from fewstep.models.sd import SDBundle
from fewstep.testing import sd15_components, tiny_sd_components
from fewstep.training.trainer import Trainer

ROWS = [("LCD full", {}, True), ("LCD full", {}, False),
        ("LCM-LoRA r64", {"lora_rank": 64, "learning_rate": 1e-4}, True),
        ("LCM-LoRA r64", {"lora_rank": 64, "learning_rate": 1e-4}, False)]


def write_images(folder: Path, n: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg")
        (folder / f"{i:04d}.txt").write_text(f"a photo of object number {i}")
    return folder


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--bpe", default=None, help="CLIP bpe_simple_vocab_16e6.txt.gz for the real vocabulary")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    res, batch = (32, a.batch or 4) if a.tiny else (512, a.batch or 12)
    tmp = Path(tempfile.mkdtemp(prefix="fewstep-bench-"))
    data = write_images(tmp / "data", max(4 * batch, 48), res + res // 8)
    results = []
    for label, extra, ckpt in ROWS:
        parts = tiny_sd_components() if a.tiny else sd15_components(bpe_gz=a.bpe, device=device)
        sched_cfg = dict(parts.pop("scheduler").config)
        bundle = SDBundle(str(tmp), {k: parts[k] for k in ("tokenizer", "text_encoder", "vae", "unet")}, sched_cfg)
        for m in (bundle.denoiser, bundle.vae, bundle.text_encoder):
            m.requires_grad_(False).eval()
        cfg = {"method": "lcm", "pretrained_teacher_model": str(tmp), "train_data_dir": str(data),
               "output_dir": str(tmp / "out"), "resolution": res, "train_batch_size": batch,
               "mixed_precision": "fp16" if cuda else "no", "max_train_steps": a.steps, "gradient_checkpointing": ckpt,
               "learning_rate": 1e-6, "lr_warmup_steps": 0, "validation_steps": 0, "checkpointing_steps": 10**6,
               "report_to": "none", "dataloader_num_workers": 4 if cuda else 0, **extra}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tr = Trainer(resolve(cfg, method_configs()), bundle=bundle)
        tr.start()
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            tr.step()  # logs are read back as floats: the step is synchronised
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        med = statistics.median(times[3:])
        results.append((label, ckpt, med, batch / med, peak))
        print(f"{label:14s} ckpt={ckpt!s:5s} {med:.3f} s/step {batch / med:6.1f} img/s peak {peak:.1f} GiB", flush=True)
        del tr, bundle, parts
        if cuda:
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n{dev}, torch {torch.__version__}, {'tiny' if a.tiny else 'SD1.5'} {res} px, batch {batch}, "
          f"{'fp16' if cuda else 'fp32'}, median of steps 4-{a.steps}\n")
    print("| method | gradient checkpointing | s/step | images/s | peak allocated GPU memory |")
    print("|---|---|---|---|---|")
    for label, ckpt, med, ips, peak in results:
        print(f"| {label} | {'on' if ckpt else 'off'} | {med:.3f} | {ips:.1f} | {peak:.1f} GiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
