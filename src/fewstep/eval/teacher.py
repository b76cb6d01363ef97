"""Distance to the teacher's own many-step samples, for the same prompts and seeds.

The distance to real data measures how close a sampler lands to the data; the distance to the
teacher's N-step samples measures how well a few-step sampler or student reproduces *the teacher*,
which is what distillation promises. On small data the two disagree: a sampler that under-applies
guidance can beat the teacher itself on real data (DPM-Solver++ at 4 steps on the MNIST teacher) while
drifting away from the teacher's samples.

    ref = teacher_images(teacher, prompts, seeds, steps=50, scheduler="ddim", guidance_scale=4)
    fd = fd_to_teacher(student_images, ref, extractor)

Both image sets must come from the same (prompt, seed) list, in the same order; the images are then
paired, and the distance between their feature distributions is the Fréchet distance.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


def teacher_images(teacher: str, prompts: list[str], seeds: list[int], steps: int = 50, scheduler: str = "ddim",
                   guidance_scale: float | None = None, resolution: int | None = None, batch_size: int = 250,
                   device: str | None = None, cache_dir: str | Path | None = None, bundles: dict | None = None,
                   progress=None) -> torch.Tensor:
    """The teacher's ``steps``-step samples (``scheduler``, its recommended guidance unless given) for every
    (prompt, seed), in [0, 1]. With ``cache_dir`` they are kept in a file keyed by every setting and the
    prompts and seeds, so several evaluations of one teacher generate them once."""
    from .run import EvalRun, generate, sampling_hints

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    gs = guidance_scale if guidance_scale is not None else sampling_hints(teacher).get("guidance_scale", 1.0)
    run = EvalRun("teacher-reference", str(teacher), scheduler, steps, gs)
    path = None
    if cache_dir is not None:
        key = json.dumps([str(Path(teacher).resolve()) if Path(teacher).exists() else teacher, scheduler, steps, gs,
                          resolution, prompts, seeds])
        path = Path(cache_dir) / f"teacher-{steps}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
        if path.is_file():
            return torch.load(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    images, _ = generate(run, prompts, seeds, resolution, batch_size, device, {} if bundles is None else bundles,
                         progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(images, tmp)
        tmp.replace(path)
    return images


def fd_to_teacher(images: torch.Tensor, teacher_samples: torch.Tensor, extractor, batch_size: int = 250) -> float:
    """Fréchet distance between a run's images and the teacher's samples for the same prompts and seeds
    (:func:`teacher_images`), under ``extractor``'s features. 0 for the teacher's own samples."""
    from .metrics import frechet_distance_between

    if len(images) != len(teacher_samples):
        raise ValueError(f"{len(images)} images against {len(teacher_samples)} teacher samples: generate both "
                         "for the same prompts and seeds")
    return frechet_distance_between(extractor, images, teacher_samples, batch_size)
