"""Uploading an exported student to the Hugging Face Hub (``--push_to_hub``, ``fewstep push``).

What is uploaded is the export and its card, nothing of the training run: for a pipeline folder the
``model_index.json`` and the folders it names; for a LoRA folder the adapter files and its scheduler;
and the top-level ``README.md`` (card), ``fewstep_*.json`` and ``fewstep_config.yaml`` (whose secrets
are masked). Checkpoints, logs, validation grids and any other folder stay local.

A failed upload never touches the local folder: the command says why it failed and how to push later,
and exits with :data:`EXIT_PUSH_FAILED`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError

EXIT_PUSH_FAILED = 3  # the run (or the folder) is complete locally; only the upload failed


class HubError(RuntimeError):
    """The upload failed (no network, no login, a refused repo); the local folder is intact."""


def export_files(folder: str | Path) -> list[str]:
    """Paths (relative, POSIX) of the export and its card in ``folder``, the files an upload sends."""
    folder = Path(folder)
    tops: list[Path] = [p for p in folder.iterdir() if p.is_file() and (
        p.name in ("model_index.json", "README.md", "fewstep_config.yaml")
        or (p.name.startswith("fewstep_") and p.suffix == ".json")
        or (p.name.startswith("pytorch_lora_weights") and p.suffix == ".safetensors"))]
    dirs = [folder / "scheduler"]
    index = folder / "model_index.json"
    if index.is_file():
        dirs += [folder / k for k in json.loads(index.read_text()) if not k.startswith("_")]
    files = tops + [f for d in dirs if d.is_dir() for f in sorted(d.rglob("*")) if f.is_file()]
    return sorted({f.relative_to(folder).as_posix() for f in files})


def check_export(folder: str | Path) -> None:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder")
    if not ((folder / "model_index.json").is_file() or (folder / "pytorch_lora_weights.safetensors").is_file()):
        raise ConfigError(f"{folder} holds no exported student (no model_index.json or "
                          "pytorch_lora_weights.safetensors): push the --output_dir of a finished run")


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """``create_repo`` (existing is fine) + one ``upload_folder`` commit of :func:`export_files`; the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    check_export(folder)
    files = export_files(folder)
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), allow_patterns=files,
                          commit_message="Upload few-step student (fewstep)")
    except Exception as e:  # network, auth, refusal: the kinds differ by huggingface_hub version
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = (f"the hub refused the credentials (HTTP {status}): log in with `hf auth login` or pass --hub_token"
               if status in (401, 403) else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        raise HubError(why) from None
    return str(getattr(repo, "url", repo))


def push_later_message(folder: str | Path, repo_id: str, why: str) -> str:
    return (f"upload to the Hugging Face Hub failed ({why}). The student in {folder} is complete and was not "
            f"changed. Push it later with:\n  fewstep push {folder} --hub_model_id {repo_id}")
