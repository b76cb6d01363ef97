"""`fewstep cache`: encode a run's data once with its teacher's VAE and text encoder(s).

The writer of the cache folders that :mod:`fewstep.data.cache` reads (the layout is documented there).
Every rank encodes its own share of the data (map-style: indices ``rank::world``; shards and file
lists: the rank's split) and writes its own parts; the main process writes ``cache.json`` last, so a
folder without it is an unfinished cache.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .config import ConfigError
from .data.cache import CACHE_FILE, PROMPTS_FILE, _atomic_save, cache_key

log = logging.getLogger("fewstep.cache")


def write_cache(spec, part_size: int = 1024) -> Path | None:
    """Encode the run's data source with its teacher's VAE and text encoder(s) into ``output_dir``;
    returns it on the main process (None on the others)."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from .data.sources import build_dataset, collate
    from .models.bundle import load_bundle, weight_dtype_of

    cfg = spec.train
    out = Path(cfg.output_dir)
    if (out / CACHE_FILE).is_file():
        raise ConfigError(f"{out} already holds a cache; choose another --output_dir or delete it")
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
    out.mkdir(parents=True, exist_ok=True)
    dt = weight_dtype_of(cfg.mixed_precision)
    bundle = load_bundle(cfg.pretrained_teacher_model, revision=cfg.teacher_revision,
                         vae_path=cfg.pretrained_vae_model_name_or_path,
                         vae_encode_batch_size=cfg.vae_encode_batch_size,
                         use_fix_crop_and_size=cfg.use_fix_crop_and_size).to(acc.device, dtype=dt)
    ds = build_dataset(cfg)
    rank, world = acc.process_index, acc.num_processes
    if hasattr(ds, "set_rank"):
        ds.set_rank(rank, world)
    else:
        ds = torch.utils.data.Subset(ds, range(rank, len(ds), world))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.train_batch_size, collate_fn=collate,
                                         num_workers=cfg.dataloader_num_workers)
    buf: dict[str, list] = {}
    parts, skipped, written = [], {}, 0

    def flush():
        nonlocal buf
        if not buf:
            return
        name = f"part-r{rank:03d}-{len(parts):05d}.safetensors"
        captions = buf.pop("caption")
        tensors = {k: torch.cat(v) for k, v in buf.items()}
        _atomic_save(tensors, out / name, {"captions": json.dumps(captions)})
        parts.append({"file": name, "count": len(captions)})
        buf = {}

    with torch.no_grad():
        for batch in tqdm(loader, desc=f"caching (rank {rank})", disable=not acc.is_main_process):
            for cause, n in batch["skipped"].items():
                skipped[cause] = skipped.get(cause, 0) + n
            if not batch["caption"]:
                continue
            moments = bundle.encode_moments(batch["pixel_values"])
            rows = {"cached_moments": moments.to("cpu", dt)}
            for k, v in bundle.embed_text(batch["caption"]).items():
                rows[f"cached_text.{k}"] = v.to("cpu", dt)
            for k in ("original_size", "crop_top_left"):
                rows[k] = batch[k]
            for k, v in rows.items():
                buf.setdefault(k, []).append(v)
            buf.setdefault("caption", []).extend(batch["caption"])
            written += len(batch["caption"])
            if written - sum(p["count"] for p in parts) >= part_size:
                flush()
        flush()
    everyone = gather_object([(rank, parts, skipped)]) if world > 1 else [(rank, parts, skipped)]
    if acc.is_main_process:
        prompts = ["", *[p for p in cfg.validation_prompts if p]]
        text = bundle.embed_text(prompts)
        _atomic_save({f"text.{k}": v.to("cpu", dt) for k, v in text.items()}, out / PROMPTS_FILE, {})
        all_parts = [p for _, ps, _ in sorted(everyone, key=lambda e: e[0]) for p in ps]
        total_skipped: dict[str, int] = {}
        for _, _, sk in everyone:
            for c, n in sk.items():
                total_skipped[c] = total_skipped.get(c, 0) + n
        count = sum(p["count"] for p in all_parts)
        if count == 0:
            raise ConfigError(f"no usable sample to cache (skipped by cause: {total_skipped or 'none'})")
        index = {"format": 1, "key": cache_key(cfg), "family": bundle.family, "count": count,
                 "dtype": str(dt).replace("torch.", ""), "parts": all_parts, "prompts": prompts,
                 "skipped": total_skipped,
                 "source": cfg.train_data_dir or cfg.train_shards_path_or_url or cfg.file_list or cfg.dataset_name}
        tmp = out / f".tmp-{CACHE_FILE}"
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, out / CACHE_FILE)
        log.info("cache of %d samples written to %s (skipped: %s)", count, out, total_skipped or "none")
    acc.wait_for_everyone()
    return out if acc.is_main_process else None
