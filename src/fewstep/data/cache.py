"""Reading `fewstep cache` folders: VAE latents and text embeddings computed once, read by every later
run (the writer is :mod:`fewstep.caching`).

Layout of a cache folder::

    cache.json                 key (teacher, VAE, family, resolution, transform), parts, counts
    prompts.safetensors        text embeddings of "" and of the validation prompts
    part-r000-00000.safetensors   per rank, in order: posterior moments (mean ‖ logvar), text
                               embeddings, each image's original size and crop; captions in the metadata

The VAE posterior's *moments* are stored, not one latent sample, so every epoch still draws a fresh
latent from the posterior exactly as encoding on the fly does. The random crop and flip, by contrast,
are drawn once, when the cache is written (as in precomputed-latent pipelines): the key records them.

Every rank encodes its own share of the data (map-style: indices ``rank::world``; shards and file
lists: the rank's split) and writes its own parts; the main process writes ``cache.json`` last, so a
folder without it is an unfinished cache. A run pointed at the cache (``--cache_dir``) checks the key
against its own settings before any model loads, then loads neither the VAE encoder nor the text
encoder(s).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError

log = logging.getLogger("fewstep.cache")

CACHE_FILE = "cache.json"
PROMPTS_FILE = "prompts.safetensors"
KEY_FIELDS = ("resolution", "center_crop", "random_flip", "interpolation_type", "use_fix_crop_and_size")


def cache_key(cfg) -> dict[str, Any]:
    """What a cache depends on: the models that made it and the image transform."""
    teacher = cfg.pretrained_teacher_model
    if teacher and Path(teacher).expanduser().exists():
        teacher = str(Path(teacher).expanduser().resolve())
    vae = cfg.pretrained_vae_model_name_or_path
    if vae and Path(vae).expanduser().exists():
        vae = str(Path(vae).expanduser().resolve())
    return {"teacher": teacher, "vae": vae, **{k: getattr(cfg, k) for k in KEY_FIELDS}}


def read_index(cache_dir: str) -> dict[str, Any]:
    p = Path(cache_dir) / CACHE_FILE
    if not p.is_file():
        hint = " (it has parts but no cache.json: the cache run did not finish; run it again)" \
            if Path(cache_dir).is_dir() and any(Path(cache_dir).glob("part-*")) else ""
        raise ConfigError(f"--cache_dir {cache_dir} is not a fewstep cache{hint}; make one with "
                          "`fewstep cache --pretrained_teacher_model ... --train_data_dir ... --output_dir DIR`")
    return json.loads(p.read_text())


def check_cache(cfg, teacher: str | None = None, teacher_flag: str = "pretrained_teacher_model") -> dict[str, Any]:
    """The cache's index, after checking that it was made for this run's teacher and transform.
    ``teacher``: the folder whose VAE made the latents when it is not --pretrained_teacher_model (a teacher
    trained from scratch on a reused VAE), named ``teacher_flag`` in messages."""
    index = read_index(cfg.cache_dir)
    want, have = cache_key(cfg), index["key"]
    if teacher is not None:
        want["teacher"] = str(Path(teacher).expanduser().resolve()) if Path(teacher).expanduser().exists() else teacher
    for k in ("teacher", "vae", *KEY_FIELDS):
        if want.get(k) != have.get(k):
            name = {"teacher": teacher_flag, "vae": "pretrained_vae_model_name_or_path"}.get(k, k)
            raise ConfigError(
                f"--cache_dir {cfg.cache_dir} was made with --{name} {have.get(k)!r}, this run has {want.get(k)!r}: "
                f"pass --{name} {have.get(k)} or re-run `fewstep cache` with this run's settings")
    return index


def load_text_cache(cache_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """prompt → {text-encoder output name: (1, ...) tensor} for "" and the validation prompts."""
    from safetensors.torch import load_file

    index = read_index(cache_dir)
    tensors = load_file(str(Path(cache_dir) / PROMPTS_FILE))
    keys = sorted({k.split(".", 1)[1] for k in tensors})
    return {p: {k: tensors[f"text.{k}"][i:i + 1] for k in keys} for i, p in enumerate(index["prompts"])}


class CachedDataset(torch.utils.data.Dataset):
    """Map-style view of every cached sample: ``cached_moments``, ``cached_text.<name>``, sizes, caption."""

    def __init__(self, cache_dir: str, max_samples: int | None = None):
        from safetensors import safe_open

        self.root = Path(cache_dir)
        index = read_index(cache_dir)
        self.parts, self.offsets, self.captions = [], [], []
        n = 0
        for part in index["parts"]:
            f = safe_open(str(self.root / part["file"]), framework="pt")
            self.parts.append(f)
            self.offsets.append(n)
            self.captions += json.loads(f.metadata()["captions"])
            n += part["count"]
        self.n = min(n, max_samples) if max_samples else n
        self.keys = list(self.parts[0].keys()) if self.parts else []
        if self.n == 0:
            raise ConfigError(f"--cache_dir {cache_dir} holds no sample")

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:  # the order comes from the trainer's sampler
        pass

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = index % self.n  # the trainer's sampler encodes the epoch in the index
        import bisect

        p = bisect.bisect_right(self.offsets, index) - 1
        f, row = self.parts[p], index - self.offsets[p]
        out = {k: f.get_slice(k)[row:row + 1][0] for k in self.keys}
        out["caption"] = self.captions[index]
        return out

    def __getstate__(self):  # safe_open handles do not pickle: data-loader workers reopen the files
        d = dict(self.__dict__)
        d["parts"] = None
        return d

    def __setstate__(self, d):
        from safetensors import safe_open

        self.__dict__.update(d)
        index = read_index(str(self.root))
        self.parts = [safe_open(str(self.root / p["file"]), framework="pt") for p in index["parts"]]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
