"""`fewstep generate`: teacher data for direct distillation (DiffSynth-Studio's metadata convention).

The teacher runs with many steps and real classifier-free guidance over a prompt list; each image is
written as a PNG next to a ``metadata.csv`` row ``image,prompt,seed,rand_device,num_inference_steps,
cfg_scale``, where the last two are the sampling settings the STUDENT will be trained for (e.g. 4 and
1). The initial latent noise is :func:`fewstep.diffusion.noise.initial_noise` of (seed, rand_device),
so training regenerates it bit for bit.

Crash safety and resumption: a PNG is written under a temporary name and renamed, then its row is
appended to this rank's part file (``metadata.part-R.csv``) and flushed to disk, so an interrupted run
loses at most the rows in flight. On start every row already in ``metadata.csv`` or a part file is
skipped. Under ``accelerate launch`` / ``torchrun`` rank r takes rows r, r + world, …; when every rank is
done the main process merges the part files into ``metadata.csv`` (written atomically, ordered by row).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError

COLUMNS = ["image", "prompt", "seed", "rand_device", "num_inference_steps", "cfg_scale"]
LATENT_COLUMN = "latents"  # present with --save_latents: the teacher's final latents (safetensors)


@dataclass
class Row:
    index: int
    prompt: str
    seed: int

    @property
    def image(self) -> str:
        return f"images/{self.index:07d}.png"

    @property
    def latents(self) -> str:
        return f"latents/{self.index:07d}.safetensors"


def read_prompts(prompts: str | None, train_data_dir: str | None, prompt_column: str | None = None) -> list[str]:
    """Prompts from a text file (one per line), a CSV/JSONL with a prompt/text/caption column, or the
    captions of an image folder / metadata file (``--train_data_dir``)."""
    if bool(prompts) == bool(train_data_dir):
        raise ConfigError("give exactly one of --prompts (a .txt or .csv file) and --train_data_dir (captions)")
    if train_data_dir:
        from .data.sources import read_metadata, scan_folder

        root = Path(train_data_dir)
        if not root.exists():
            raise ConfigError(f"--train_data_dir {root}: no such file or folder")
        records = read_metadata(root, "image", prompt_column or "text") if root.is_file() else \
            scan_folder(root, "image", prompt_column or "text")
        out = [c.strip() for _, c, _ in records if c and c.strip()]
    else:
        p = Path(prompts)
        if not p.is_file():
            raise ConfigError(f"--prompts {p}: no such file")
        if p.suffix.lower() in (".csv", ".jsonl"):
            if p.suffix.lower() == ".csv":
                with p.open(newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
            else:
                rows = [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            keys = [prompt_column] if prompt_column else ["prompt", "text", "caption"]
            key = next((k for k in keys if rows and k in rows[0]), None)
            if key is None:
                cols = ", ".join(rows[0]) if rows else "none"
                raise ConfigError(f"--prompts {p}: no {' / '.join(keys)} column (columns: {cols}); "
                                  "set --prompt_column")
            out = [str(r[key]).strip() for r in rows if r.get(key) and str(r[key]).strip()]
        else:
            out = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not out:
        raise ConfigError("no prompts found (empty file or no captions)")
    return out


def plan_rows(prompts: list[str], images_per_prompt: int, seed: int, num_images: int | None) -> list[Row]:
    """Row i: prompt i // images_per_prompt, seed ``seed + i``; the plan is a pure function of the
    arguments, so a resumed run, or another rank, agrees on every row."""
    rows = [Row(i, prompts[i // images_per_prompt], seed + i) for i in range(len(prompts) * images_per_prompt)]
    return rows[:num_images] if num_images else rows


def read_done(out: Path) -> dict[str, dict]:
    """Rows already written, by image path: from metadata.csv and every part file."""
    done: dict[str, dict] = {}
    for f in [out / "metadata.csv", *sorted(out.glob("metadata.part-*.csv"))]:
        if not f.is_file():
            continue
        with f.open(newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                # A row whose image is missing (deleted by hand) is regenerated.
                if r.get("image") and (out / r["image"]).is_file():
                    done[r["image"]] = r
    return done


def merge_parts(out: Path) -> int:
    """Write metadata.csv from itself and the part files (deduplicated, ordered by image), atomically,
    then remove the parts. Returns the number of rows."""
    done = read_done(out)
    cols = COLUMNS + ([LATENT_COLUMN] if any(r.get(LATENT_COLUMN) for r in done.values()) else [])
    tmp = out / "metadata.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for key in sorted(done):
            w.writerow(done[key])
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / "metadata.csv")
    for part in out.glob("metadata.part-*.csv"):
        part.unlink()
    return len(done)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _save_png(img: torch.Tensor, path: Path) -> None:
    import numpy as np
    from PIL import Image

    arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


def _save_latents(lat: torch.Tensor, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({"latents": lat.detach().float().cpu().contiguous()}, str(tmp))
    os.replace(tmp, path)


def teacher_scheduler(bundle, name: str | None):
    """The teacher's own scheduler class (what its pipeline runs), or one by short name."""
    import diffusers

    from .diffusion.sampling import make_scheduler

    if name:
        return make_scheduler(name, bundle.scheduler_config)
    cls = getattr(diffusers, bundle.scheduler_config.get("_class_name", "DDIMScheduler"))
    return cls.from_config(bundle.scheduler_config)


# fewstep_generate.json keys that decide what a row holds, with the flag that sets each
SETTINGS = {"teacher": "--teacher", "teacher_steps": "--teacher_steps", "teacher_guidance_scale": "--teacher_guidance_scale",
            "teacher_scheduler": "--teacher_scheduler", "resolution": "--resolution", "student_steps": "--student_steps",
            "student_guidance_scale": "--student_guidance_scale", "rand_device": "--rand_device"}
# the same settings as written in each metadata.csv row
ROW_SETTINGS = {"rand_device": "rand_device", "student_steps": "num_inference_steps",
                "student_guidance_scale": "cfg_scale"}


def _teacher_id(teacher: str) -> str:
    """A local teacher folder by its absolute path (``./t`` and ``/abs/t`` are the same teacher)."""
    return str(Path(teacher).resolve()) if Path(teacher).exists() else str(teacher)


def check_settings(out: Path, settings: dict, done: dict[str, dict]) -> None:
    """Refuse to add rows to ``out`` under other settings than its rows were generated with (recorded in
    fewstep_generate.json and in each row): the data set would mix two teachers' distributions."""
    p = out / "fewstep_generate.json"
    old = json.loads(p.read_text()) if p.is_file() else {}
    if "teacher" in old:
        old["teacher"] = _teacher_id(old["teacher"])
    diff = {k: (old[k], v) for k, v in settings.items() if k in old and old[k] != v}
    for r in done.values():  # rows of a run interrupted before the JSON was written
        for k, col in ROW_SETTINGS.items():
            was = type(settings[k])(r[col]) if r.get(col) not in (None, "") else settings[k]
            if k not in diff and was != settings[k]:
                diff[k] = (was, settings[k])
    if diff:
        what = ", ".join(f"{SETTINGS[k]} {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ConfigError(f"{out} holds rows generated with other settings ({what}): rerun with the same settings "
                          "(new prompts may be added), or use a new --output_dir")


def generate(teacher: str, out_dir: str, prompts: list[str], *, teacher_steps: int = 50,
             teacher_guidance_scale: float = 4.0, student_steps: int = 4, student_guidance_scale: float = 1.0,
             images_per_prompt: int = 1, seed: int = 0, rand_device: str = "cpu", num_images: int | None = None,
             resolution: int | None = None, batch_size: int = 16, scheduler: str | None = None,
             save_latents: bool = False, device: str | None = None, progress: bool = True) -> dict:
    """Generate the rows this rank owns that are not written yet; merge on the main process. Returns
    counts {"rows": all planned, "generated": by this rank, "skipped": already there}."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from .diffusion.noise import batch_noise
    from .diffusion.sampling import sample_latents
    from .models.bundle import load_bundle

    if teacher_steps < 1 or student_steps < 1:
        raise ConfigError("--teacher_steps and --student_steps must be >= 1")
    if images_per_prompt < 1 or batch_size < 1:
        raise ConfigError("--images_per_prompt and --batch_size must be >= 1")
    if rand_device != "cpu" and not rand_device.startswith("cuda"):
        raise ConfigError(f"--rand_device {rand_device!r}: use cpu (reproducible anywhere) or cuda")
    if rand_device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--rand_device {rand_device}: CUDA is not available on this machine; use --rand_device cpu "
                          "(the same noise on any machine)")
    if scheduler:
        from .diffusion.sampling import check_scheduler

        check_scheduler(scheduler, "--teacher_scheduler")
    state = PartialState()
    rank, world = state.process_index, state.num_processes
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if save_latents:
        (out / "latents").mkdir(exist_ok=True)
    state.wait_for_everyone()
    rows = plan_rows(prompts, images_per_prompt, seed, num_images)
    done = read_done(out)
    for r in rows:
        old = done.get(r.image)
        if old is not None and (old["prompt"] != r.prompt or int(old["seed"]) != r.seed):
            raise ConfigError(
                f"{out}: {r.image} was written for prompt {old['prompt']!r} seed {old['seed']}, but these arguments "
                f"plan prompt {r.prompt!r} seed {r.seed}: resume with the same --prompts, --images_per_prompt and "
                "--seed, or use a new --output_dir")
    mine = [r for r in rows[rank::world]
            if r.image not in done or (save_latents and not (out / r.latents).is_file())]
    skipped = len(rows[rank::world]) - len(mine)

    device = device or (str(state.device) if torch.cuda.is_available() else "cpu")
    bundle = load_bundle(teacher).to(device)
    sched = teacher_scheduler(bundle, scheduler)
    res = resolution or bundle.default_resolution
    if res % bundle.vae_scale:
        raise ConfigError(f"--resolution {res} must be a multiple of the VAE factor {bundle.vae_scale}")
    shape = bundle.latent_shape(res, res)
    settings = {"teacher": _teacher_id(teacher), "teacher_steps": teacher_steps,
                "teacher_guidance_scale": float(teacher_guidance_scale), "teacher_scheduler": type(sched).__name__,
                "resolution": res, "student_steps": student_steps,
                "student_guidance_scale": float(student_guidance_scale), "rand_device": rand_device}
    check_settings(out, settings, done)
    state.wait_for_everyone()
    if state.is_main_process:  # recorded before the first row, so an interrupted run is checked too
        _write_json(out / "fewstep_generate.json", {**settings, "rows": len(done)})
    part = out / f"metadata.part-{rank}.csv"
    new_file = not part.is_file()
    bar = tqdm(total=len(mine), desc=f"teacher images (rank {rank})", unit="img",
               disable=not progress or not state.is_local_main_process)
    with part.open("a", newline="", encoding="utf-8") as fh:
        cols = COLUMNS + ([LATENT_COLUMN] if save_latents else [])
        w = csv.DictWriter(fh, fieldnames=cols)
        if new_file:
            w.writeheader()
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            noise = batch_noise([r.seed for r in chunk], [rand_device] * len(chunk), shape)
            with torch.no_grad():
                lat = sample_latents(bundle, bundle.denoiser, sched, [r.prompt for r in chunk], [r.seed for r in chunk],
                                     teacher_steps, teacher_guidance_scale, res, res, noise=noise)
                imgs = bundle.decode(lat).cpu()
            for r, img, z in zip(chunk, imgs, lat):
                if save_latents:
                    _save_latents(z, out / r.latents)
                _save_png(img, out / r.image)
                row = {"image": r.image, "prompt": r.prompt, "seed": r.seed, "rand_device": rand_device,
                       "num_inference_steps": student_steps, "cfg_scale": student_guidance_scale}
                if save_latents:
                    row[LATENT_COLUMN] = r.latents
                w.writerow(row)
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(chunk))
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        n = merge_parts(out)
        _write_json(out / "fewstep_generate.json", {**settings, "rows": n})
    state.wait_for_everyone()
    return {"rows": len(rows), "generated": len(mine), "skipped": skipped}


def cmd_generate(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="fewstep generate", description=(
        "Teacher data for --method direct: images from the teacher at many steps with real CFG, and "
        "metadata.csv (image,prompt,seed,rand_device,num_inference_steps,cfg_scale; the last two are the "
        "student's settings). Resumable; split across ranks under accelerate launch / torchrun."))
    p.add_argument("--teacher", required=True, help="diffusers folder (or hub id) of the teacher")
    p.add_argument("--output_dir", required=True, help="where images/ and metadata.csv go")
    p.add_argument("--prompts", default=None, help="text file (one prompt per line) or CSV/JSONL with a prompt column")
    p.add_argument("--train_data_dir", default=None, help="use the captions of this image folder / metadata file")
    p.add_argument("--prompt_column", default=None, help="prompt column of a CSV/JSONL (default prompt, text, caption)")
    p.add_argument("--images_per_prompt", type=int, default=1)
    p.add_argument("--num_images", type=int, default=None, help="stop after this many rows in all")
    p.add_argument("--teacher_steps", type=int, default=50)
    p.add_argument("--teacher_guidance_scale", type=float, default=None,
                   help="default: the teacher folder's fewstep_sampling.json guidance, else 4.0")
    p.add_argument("--teacher_scheduler", default=None,
                   help="ddim, ddim-leading, dpm++, euler, ... (default: the teacher's own scheduler)")
    p.add_argument("--student_steps", type=int, default=4, help="written as num_inference_steps")
    p.add_argument("--student_guidance_scale", type=float, default=1.0, help="written as cfg_scale")
    p.add_argument("--seed", type=int, default=0, help="row i uses seed + i")
    p.add_argument("--rand_device", default="cpu", help="device whose generator draws the initial noise")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--save_latents", action="store_true",
                   help="also store the teacher's final latents (latents/*.safetensors, column 'latents')")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    gs = a.teacher_guidance_scale
    if gs is None:
        hints = Path(a.teacher) / "fewstep_sampling.json"
        gs = json.loads(hints.read_text()).get("guidance_scale", 4.0) if hints.is_file() else 4.0
    prompts = read_prompts(a.prompts, a.train_data_dir, a.prompt_column)
    r = generate(a.teacher, a.output_dir, prompts, teacher_steps=a.teacher_steps, teacher_guidance_scale=gs,
                 student_steps=a.student_steps, student_guidance_scale=a.student_guidance_scale,
                 images_per_prompt=a.images_per_prompt, seed=a.seed, rand_device=a.rand_device,
                 num_images=a.num_images, resolution=a.resolution, batch_size=a.batch_size,
                 scheduler=a.teacher_scheduler, save_latents=a.save_latents, device=a.device)
    print(f"{a.output_dir}/metadata.csv: {r['rows']} rows planned, {r['generated']} generated here, "
          f"{r['skipped']} already there")
    return 0
