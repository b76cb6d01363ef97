"""Bad data, bad values, untrusted shard commands (issue 16, items 9, 10, 11, 13): each bad sample is read
correctly or skipped and counted by cause, the same way in folders, metadata files and shards; batches
keep their size; every bad setting is refused with exit 2 before a model loads; `--dry_run` never runs a
`pipe:` command."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.data import build_dataset, collate

ASSETS = Path(__file__).resolve().parents[1] / "src" / "fewstep" / "assets"


def _png(seed=0, size=40) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width=20_000, height=10_000) -> bytes:
    """A valid PNG header for a 200-megapixel grey image (Pillow refuses it before decoding)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def _png16(grey: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG (Pillow writes them as mode I;16)."""
    buf = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(tmp_path, files: dict[str, bytes]) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def _ds(**kw):
    argv = ["--pretrained_teacher_model", "t", "--resolution", "32", "--center_crop"]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    return build_dataset(parse_run(argv).train)


def _causes(samples) -> dict[str, int]:
    return collate(list(samples))["skipped"]


def _shard(path: Path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


# ---- 9. invalid UTF-8, decompression bombs, 16-bit PNGs, GIFs ---------------------------------

def test_a_caption_file_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    d = _folder(tmp_path, {"a.png": _png(0), "a.txt": b"a cat", "b.png": _png(1), "b.txt": b"a caf\xe9 latte",
                           "c.png": _png(2), "c.txt": "a café".encode()})
    ds = _ds(train_data_dir=d)
    samples = [ds[i] for i in range(len(ds))]
    assert _causes(samples) == {"caption not UTF-8": 1}
    assert [s.get("caption") for s in samples] == ["a cat", None, "a café"]
    assert "b.txt (invalid byte at offset 5)" in samples[1]["_where"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_metadata_row_that_is_not_utf8_is_skipped_and_counted(fmt, tmp_path):
    rows = [("0.png", b"a cat"), ("1.png", b"a caf\xe9"), ("2.png", b"a dog")]
    if fmt == "csv":
        text = b"file_name,text\n" + b"".join(f"{f},".encode() + c + b"\n" for f, c in rows)
    else:
        text = b"".join(b'{"file_name": "' + f.encode() + b'", "text": "' + c + b'"}\n' for f, c in rows)
    d = _folder(tmp_path, {"0.png": _png(0), "1.png": _png(1), "2.png": _png(2), f"metadata.{fmt}": text})
    ds = _ds(train_data_dir=d)
    samples = [ds[i] for i in range(len(ds))]
    assert _causes(samples) == {"caption not UTF-8": 1}
    assert f"metadata.{fmt}:{3 if fmt == 'csv' else 2}" in samples[1]["_where"]
    assert samples[2]["caption"] == "a dog"


def test_a_shard_caption_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    _shard(tmp_path / "0.tar", [("a", {"png": _png(0), "txt": b"a cat"}), ("b", {"png": _png(1), "txt": b"caf\xe9"})])
    items = list(_ds(train_shards_path_or_url=tmp_path / "0.tar"))
    assert _causes(items) == {"caption not UTF-8": 1}  # before: "caf\ufffd", used as a caption
    assert [s["caption"] for s in items if "caption" in s] == ["a cat"]


def test_a_200_megapixel_image_is_skipped_as_too_large_in_folders_and_shards(tmp_path):
    d = _folder(tmp_path, {"a.png": _png(0), "a.txt": b"a cat", "big.png": _bomb_png(), "big.txt": b"a big cat"})
    ds = _ds(train_data_dir=d)
    assert _causes([ds[0], ds[1]]) == {"image too large": 1}  # before: DecompressionBombError, a traceback
    _shard(tmp_path / "0.tar", [("a", {"png": _png(0), "txt": b"a cat"}), ("big", {"png": _bomb_png(), "txt": b"x"})])
    assert _causes(_ds(train_shards_path_or_url=tmp_path / "0.tar")) == {"image too large": 1}


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    digit = np.load(ASSETS / "mnist_subset.npz")["train_images"][0]  # uint8, mean ≈ 35 of 255
    d = _folder(tmp_path, {"d8.png": _png(0), "d16.png": _png16(digit.astype(np.uint16) * 257),
                           "d8.txt": b"a digit", "d16.txt": b"a digit"})
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, format="PNG")
    (d / "d8.png").write_bytes(buf.getvalue())
    ds = _ds(train_data_dir=d)
    x16, x8 = (ds[i]["pixel_values"] for i in range(2))  # sorted: d16.png, d8.png
    assert torch.equal(x16, x8)  # exactly the 8-bit digit (x·257/257); Pillow alone clips it to white


def test_gif_files_in_a_folder_and_a_shard_are_read(tmp_path):
    grey = np.load(ASSETS / "mnist_subset.npz")["train_images"][1]
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="GIF")  # ≤ 256 grey levels: lossless
    gif = buf.getvalue()
    png = io.BytesIO()
    Image.fromarray(grey).save(png, format="PNG")
    d = _folder(tmp_path, {"a.gif": gif, "a.txt": b"a digit", "b.png": png.getvalue(), "b.txt": b"a digit"})
    ds = _ds(train_data_dir=d)
    assert len(ds) == 2 and torch.equal(ds[0]["pixel_values"], ds[1]["pixel_values"])
    _shard(tmp_path / "0.tar", [("a", {"gif": gif, "txt": b"a digit"})])
    (item,) = list(_ds(train_shards_path_or_url=tmp_path / "0.tar"))
    assert torch.equal(item["pixel_values"], ds[1]["pixel_values"])


# ---- 10. batches keep their size -----------------------------------------------------------

def _record_logs(monkeypatch):
    from fewstep.training.trainer import Trainer

    seen, real = [], Trainer.step

    def step(self):
        logs = real(self)
        seen.append(logs)
        return logs

    monkeypatch.setattr(Trainer, "step", step)
    return seen


def test_bad_samples_are_replaced_so_batches_keep_their_size(tiny_teacher, tmp_path, monkeypatch):
    files = {}
    for i in range(12):
        files[f"{i:02d}.png"] = b"garbage" if i % 3 == 0 else _png(i)
        files[f"{i:02d}.txt"] = b"a photo of a cat"
    d = _folder(tmp_path, files)
    seen = _record_logs(monkeypatch)
    out = tmp_path / "o"
    assert main(["distill", *run_args(tiny_teacher, d, out, train_batch_size=4, max_train_steps=6,
                                      checkpointing_steps=6)]) == 0
    assert [s["batch_size"] for s in seen] == [4] * 6  # before: batches of 2 or 3
    from fewstep.training.checkpoint import read_state_file

    st = read_state_file(out / "checkpoint-6")["train"]
    assert st["samples_trained"] == 24 and st["last_batch"] == 4
    assert st["skipped"] == {"corrupt image": 8}  # 4 bad of 12, two epochs, each counted where it stood


def test_bad_stream_items_do_not_shrink_batches(tiny_teacher, tmp_path, monkeypatch):
    samples = [(f"k{i}", {"png": b"garbage" if i in (1, 4) else _png(i), "txt": b"a photo of a cat"}) for i in range(10)]
    _shard(tmp_path / "0.tar", samples)
    seen = _record_logs(monkeypatch)
    args = run_args(tiny_teacher, "-", tmp_path / "o", train_batch_size=2, max_train_steps=4, checkpointing_steps=4)
    i = args.index("--train_data_dir")
    args[i:i + 2] = ["--train_shards_path_or_url", str(tmp_path / "0.tar")]
    assert main(["distill", *args]) == 0
    assert [s["batch_size"] for s in seen] == [2, 2, 2, 2]


# ---- 11. bad values: exit 2 before any model loads ------------------------------------------

def _bad_values(teacher, data):
    import importlib.util

    cases = [("adam_epsilon", "-1e-8"), ("adam_beta1", "1.0"), ("adam_beta2", "-0.1"), ("adam_weight_decay", "-0.01"),
             ("seed", "-1"), ("seed", str(2**32)), ("num_ddim_timesteps", "2000"), ("num_ddim_timesteps", "300"),
             ("unet_time_cond_proj_dim", "3"), ("validation_prompts", ""), ("validation_prompts", "|"),
             ("max_train_samples", "0"), ("max_train_samples", "-3"), ("lr_warmup_steps", "-5"), ("output_dir", ""),
             ("output_dir", str(teacher)), ("output_dir", str(data))]
    for key, module in (("use_8bit_adam", "bitsandbytes"), ("enable_xformers_memory_efficient_attention", "xformers")):
        if importlib.util.find_spec(module) is None:
            cases.append((key, "true"))
    if importlib.util.find_spec("wandb") is None:
        cases.append(("report_to", "wandb"))
    return cases


def test_every_bad_value_exits_2_naming_the_key_before_a_model_loads(tiny_teacher, caption_folder, tmp_path,
                                                                    monkeypatch, capsys):
    import fewstep.models.bundle as bundle

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(bundle, "load_bundle", no_model)
    for cls in bundle.family_classes():
        monkeypatch.setattr(cls, "load", classmethod(no_model))
    results = {}
    for key, value in _bad_values(tiny_teacher, caption_folder):
        argv = run_args(tiny_teacher, caption_folder, tmp_path / "o", validation_steps=1, max_train_steps=2)
        argv += [f"--{key}", value]
        code = main(["distill", *argv])
        err = capsys.readouterr().err
        results[(key, value)] = (code, f"--{key}" in err and "error:" in err and "Traceback" not in err)
    bad = {k: v for k, v in results.items() if v != (2, True)}
    assert not bad, bad
    assert len(results) >= 17


# ---- 13. pipe: shards are shell commands; --dry_run never runs them ---------------------------

def test_dry_run_prints_pipe_commands_and_never_runs_them(tiny_teacher, tmp_path, capsys):
    _shard(tmp_path / "0.tar", [(f"k{i}", {"png": _png(i), "txt": b"a photo of a cat"}) for i in range(2)])
    marker = tmp_path / "RAN"
    pipe = f"pipe:touch {marker} && cat {tmp_path / '0.tar'}"
    for spec in (pipe, f"{pipe}::{tmp_path / '0.tar'}"):  # only pipe: shards; pipe: and a local one
        argv = ["distill", "--dry_run", "--pretrained_teacher_model", str(tiny_teacher), "--train_shards_path_or_url",
                spec, "--resolution", "32", "--train_batch_size", "1", "--output_dir", str(tmp_path / "o")]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert not marker.exists(), "--dry_run ran a pipe: command"
        assert f"training would run: touch {marker} && cat {tmp_path / '0.tar'}" in out and "dry run OK" in out
    assert "first sample (3, 32, 32)" in out  # the local shard was still opened


def test_pipe_shards_still_run_in_training(tiny_teacher, tmp_path):
    """The dry run's refusal is the only difference: a real run streams through the command."""
    _shard(tmp_path / "0.tar", [(f"k{i}", {"png": _png(i), "txt": b"a photo of a cat"}) for i in range(4)])
    ds = _ds(train_shards_path_or_url=f"pipe:cat {tmp_path / '0.tar'}")
    assert len([s for s in ds if "caption" in s]) == 4


def test_metadata_json_must_be_rows(tmp_path):
    from fewstep.config import ConfigError

    d = _folder(tmp_path, {"metadata.json": json.dumps({"a": 1}).encode()})
    with pytest.raises(ConfigError, match="every row must be an object"):
        _ds(train_data_dir=d)
