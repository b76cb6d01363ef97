"""Shared fixtures: tiny random-weight teachers and caption folders, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

SHARED = Path(__file__).resolve().parents[2] / "shared"


def free_port() -> int:
    """A TCP port nothing listens on now, for one multi-process launch's rendezvous. Launches on the default
    port (29500) meet any other job on the machine that uses it and join its store: both hang (a torchrun
    job running beside the two-process test made it wait until its timeout). torchrun takes --standalone."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    from fewstep.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("teacher-eps") / "teacher", prediction_type="epsilon")


@pytest.fixture(scope="session")
def tiny_teacher_v(tmp_path_factory) -> Path:
    from fewstep.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("teacher-v") / "teacher", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def caption_folder(tmp_path_factory) -> Path:
    from fewstep.testing import write_caption_folder

    return write_caption_folder(tmp_path_factory.mktemp("data") / "images", n=12, size=40)


def run_args(teacher, data, out, **kw) -> list[str]:
    """Command-line arguments of a tiny LCD run."""
    base = dict(method="lcm", pretrained_teacher_model=teacher, train_data_dir=data, output_dir=out,
                resolution=32, train_batch_size=2, max_train_steps=2, learning_rate=1e-4, lr_warmup_steps=0,
                validation_steps=0, checkpointing_steps=100, report_to="none", seed=0)
    base.update(kw)
    argv = []
    for k, v in base.items():
        argv += [f"--{k}", str(v)]
    return argv


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from fewstep.testing import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("teacher-sdxl") / "teacher")


def card_snippet(out) -> str:
    """The python block of the model card (README.md) fewstep wrote into ``out``."""
    text = (Path(out) / "README.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]
