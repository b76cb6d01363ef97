"""The evaluation report folder: report.md (table), results.json (every number), grid.png (rows: runs,
same seeds across a row), distance_vs_steps.png."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch


def markdown_table(results) -> str:
    clip = any(r.clip_score is not None for r in results)
    teacher = any(getattr(r, "fd_teacher", None) is not None for r in results)
    rows = ["| model | scheduler | steps | guidance | Fréchet distance | "
            + ("FD to teacher | " if teacher else "") + "digit accuracy | "
            + ("CLIP score | " if clip else "") + "s / image |",
            "|---|---|---|---|---|" + ("---|" if teacher else "") + "---|" + ("---|" if clip else "") + "---|"]
    for r in results:
        acc = "–" if r.digit_accuracy is None else f"{100 * r.digit_accuracy:.1f}%"
        cs = (f"{r.clip_score:.2f} | " if r.clip_score is not None else "– | ") if clip else ""
        ft = (f"{r.fd_teacher:.2f} | " if r.fd_teacher is not None else "– | ") if teacher else ""
        rows.append(f"| {r.label} | {r.scheduler} | {r.steps} | {r.guidance_scale:g} | {r.frechet_distance:.2f} | "
                    f"{ft}{acc} | {cs}{'–' if r.seconds_per_image != r.seconds_per_image else f'{r.seconds_per_image:.4f}'} |")
    return "\n".join(rows)


def labelled_grid(grids: list[tuple[str, torch.Tensor]], label_width: int = 150) -> np.ndarray:
    from PIL import Image, ImageDraw

    rows = []
    for label, imgs in grids:
        strip = torch.cat(list(imgs), dim=-1).clamp(0, 1)
        arr = (strip.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        canvas = Image.new("RGB", (label_width + arr.shape[1], arr.shape[0]), "white")
        canvas.paste(Image.fromarray(arr), (label_width, 0))
        ImageDraw.Draw(canvas).text((4, arr.shape[0] // 2 - 6), label, fill="black")
        rows.append(np.asarray(canvas))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def plot_distance(results, path: Path, x: str = "steps", xlabel: str = "sampling steps") -> None:
    """Distance against ``x`` (an attribute or key of each result), one line per label and scheduler;
    a second panel with the distance to the teacher's samples when the results have it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def get(r, k):
        return r.get(k) if isinstance(r, dict) else getattr(r, k, None)

    panels = [("frechet_distance", "Fréchet distance to real data")]
    if any(get(r, "fd_teacher") is not None for r in results):
        panels.append(("fd_teacher", "Fréchet distance to the teacher's samples"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        series: dict[str, list] = {}
        for r in results:
            if get(r, key) is not None:
                series.setdefault(f"{get(r, 'label')} ({get(r, 'scheduler')})", []).append((get(r, x), get(r, key)))
        for name, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker="o", label=name)
        if x == "steps":
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{title} (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_partial(out_dir: Path, results, meta: dict, total: int) -> None:
    """``results.json`` and the table so far, rewritten (atomically) after every run of an evaluation."""
    out_dir = Path(out_dir)
    data = {"meta": {**meta, "complete": len(results) == total, "runs_done": len(results), "runs_planned": total},
            "results": [asdict(r) for r in results]}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out_dir / "results.json")
    tmp = out_dir / "report.md.tmp"
    tmp.write_text(f"# Quality vs steps (in progress: {len(results)} of {total} runs)\n\n" + markdown_table(results)
                   + "\n")
    tmp.replace(out_dir / "report.md")


def write_report(out_dir: Path, results, grids, meta: dict) -> None:
    from PIL import Image

    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps({"meta": {**meta, "complete": True}, "results": [
        asdict(r) for r in results]}, indent=2) + "\n")
    Image.fromarray(labelled_grid(grids)).save(out_dir / "grid.png")
    plot_distance(results, out_dir / "distance_vs_steps.png")
    text = (f"# Quality vs steps\n\n{meta.get('num_images')} images per row, same prompts and seeds for every "
            f"model; Fréchet distance with the `{meta.get('extractor')}` features against "
            f"{meta.get('reference_images')} reference images; device {meta.get('device')}."
            + (f" FD to teacher: the distance to the teacher's own samples ({meta['teacher_reference']}) for the "
               "same prompts and seeds." if meta.get("teacher_reference") else "") + "\n\n"
            + markdown_table(results) + "\n\n![grid](grid.png)\n\n![distance](distance_vs_steps.png)\n")
    (out_dir / "report.md").write_text(text)
