"""Data-loader throughput: is the loader fast enough to keep a GPU busy?

Measures samples/s of fewstep's own loaders, as training uses them (the same data set classes,
``collate`` and a ``torch.utils.data.DataLoader`` with N workers), for
  1. WebDataset shards of 576 px JPEGs with captions, decoded, resized, randomly cropped to 512 px and
     flipped (the SD1.5 setting of benchmarks/LORA_VS_FULL.md and issue 8);
  2. a `fewstep cache` of the same samples at SD1.5 sizes (posterior moments 8×64×64 and CLIP hidden
     states 77×768, fp16), in the cache's on-disk format;
and prints them next to the samples/s one GPU consumes (measured step times, recorded in the repo).

    python benchmarks/loader.py --samples 480 --workers 2      # results: benchmarks/LOADER.md
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewstep.cli import parse_run
from fewstep.data import build_dataset, collate

# samples/s one H100 consumes in an LCD-full step at batch 12, 512 px (benchmarks/LORA_VS_FULL.md: fewstep
# 0.836 s/step without checkpointing; the issue-8 reference script 0.453 s/step; issue 8's goal is 2x that).
GPU_DEMAND = {"fewstep LCD full (H100, measured)": 12 / 0.836, "diffusers reference (H100, measured)": 12 / 0.453,
              "issue 8 goal: 2x reference": 2 * 12 / 0.453}


def photo_like(rng, size: int) -> Image.Image:
    """A smooth random image (upsampled noise): JPEG sizes near real photos', unlike white noise."""
    small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    noise = rng.integers(-12, 12, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def write_shards(root: Path, n: int, per_shard: int = 48, size: int = 576) -> str:
    rng = np.random.default_rng(0)
    k = 0
    for s in range((n + per_shard - 1) // per_shard):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for _ in range(min(per_shard, n - k)):
                buf = io.BytesIO()
                photo_like(rng, size).save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a photo number {k}".encode())):
                    info = tarfile.TarInfo(f"{k:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    return str(root / f"{{00000..{s:05d}}}.tar")


def write_cache(root: Path, n: int, part: int = 256) -> str:
    """A cache folder in `fewstep cache`'s format with SD1.5-sized fp16 tensors."""
    from fewstep.data.cache import _atomic_save

    parts = []
    for i in range(0, n, part):
        m = min(part, n - i)
        name = f"part-r000-{len(parts):05d}.safetensors"
        _atomic_save({"cached_moments": torch.randn(m, 8, 64, 64).half(),
                      "cached_text.encoder_hidden_states": torch.randn(m, 77, 768).half(),
                      "original_size": torch.full((m, 2), 512), "crop_top_left": torch.zeros(m, 2, dtype=torch.long)},
                     root / name, {"captions": json.dumps([f"a photo number {i + j}" for j in range(m)])})
        parts.append({"file": name, "count": m})
    (root / "cache.json").write_text(json.dumps({"format": 1, "key": {}, "parts": parts, "count": n, "prompts": [""]}))
    return str(root)


def measure(ds, batch: int, workers: int, n: int, is_map: bool) -> float:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate,
                                         shuffle=is_map, drop_last=False, persistent_workers=False)
    it = iter(loader)
    seen = len(next(it)["caption"])  # worker start-up and the first batch are not counted
    t0 = time.perf_counter()
    got = 0
    for b in it:
        got += len(b["caption"])
        if seen + got >= n:
            break
    return got / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=480)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--resolution", type=int, default=512)
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "shards").mkdir()
        (tmp / "cache").mkdir()
        t0 = time.perf_counter()
        spec = write_shards(tmp / "shards", a.samples)
        print(f"wrote {a.samples} JPEGs (576 px) in shards in {time.perf_counter() - t0:.1f} s")
        write_cache(tmp / "cache", a.samples)
        cfg = parse_run(["--pretrained_teacher_model", "x", "--train_shards_path_or_url", spec,
                         "--resolution", str(a.resolution), "--random_flip"]).train
        shard_rate = measure(build_dataset(cfg), a.batch, a.workers, a.samples, is_map=False)
        from fewstep.data.cache import CachedDataset

        cache_rate = measure(CachedDataset(str(tmp / "cache")), a.batch, a.workers, a.samples, is_map=True)
    print(f"\n| loader ({a.workers} workers, batch {a.batch}) | samples/s |\n|---|---|")
    print(f"| WebDataset shards, 576 px JPEG → {a.resolution} px random crop + flip | {shard_rate:.1f} |")
    print(f"| fewstep cache (SD1.5 sizes, fp16) | {cache_rate:.1f} |")
    print("\n| one GPU consumes | samples/s |\n|---|---|")
    for k, v in GPU_DEMAND.items():
        print(f"| {k} | {v:.1f} |")


if __name__ == "__main__":
    main()
