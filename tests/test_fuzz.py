"""Fuzz-style tests, seeded and bounded in time: random malformed options and YAML files always end in a
ConfigError with a message (exit 2 from the command line), never another exception and never a
silently accepted non-finite or mistyped value; random corrupt images, CSV rows and tar shards are
skipped and counted by cause, or rejected with a ConfigError when the metadata file itself is
unusable, never a crash."""

from __future__ import annotations

import dataclasses
import io
import math
import random
import tarfile
import time
import types
import typing

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.cli import main, method_configs, parse_run
from fewstep.config import ConfigError, TrainConfig
from fewstep.data import build_dataset, collate

BUDGET_S = 8.0  # per fuzz test; the case counts below normally finish well within it

VALUES = ["", " ", "nan", "NaN", "inf", "-inf", "1e400", "-1", "0", "1", "3.5", "1e-3", "999999999999999999999",
          "true", "false", "none", "null", "yes", "--", "-", "a,b", "1 2 3", "ü∂ƒ", "\x00", "0x10", "1_000",
          "[1, 2]", "{a: 1}", "fp16", "bf16", "lcm", "teacher", "cosine", "huber", "l2", "latest"]


def _keys():
    keys = [f.name for c in [TrainConfig, *(m.Config for m in method_configs().values())] for f in dataclasses.fields(c)]
    return keys + ["lerning_rate", "resolutionn", "x", "", "method-", "train-batch-size", "max_steps"]


def _random_argv(rng: random.Random, keys) -> list[str]:
    argv = ["--pretrained_teacher_model", "teacher-that-is-never-loaded"] if rng.random() < 0.8 else []
    for _ in range(rng.randint(1, 5)):
        key = rng.choice(keys)
        form = rng.random()
        if form < 0.1:
            argv.append(rng.choice(["--" + key, key, "-" + key]))  # bare flag or not an option at all
        elif form < 0.2:
            argv.append(f"--{key}={rng.choice(VALUES)}")
        else:
            argv += ["--" + key] + [rng.choice(VALUES) for _ in range(rng.choice([1, 1, 1, 2]))]
    return argv


def _of_type(v, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_of_type(v, a) for a in args)
    if tp is type(None):
        return v is None
    if origin is list:
        return isinstance(v, list) and all(_of_type(x, args[0]) for x in v)
    if tp in (int, float):
        return isinstance(v, (int, float) if tp is float else int) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, tp)


def _check_accepted(spec) -> None:
    """An accepted config holds only values of the declared types, and finite numbers."""
    for obj in (spec.train, spec.method):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            assert _of_type(getattr(obj, f.name), hints[f.name]), (f.name, getattr(obj, f.name))


def test_random_command_lines_give_config_errors_or_valid_specs():
    rng = random.Random(0)
    keys = _keys()
    t0, n, errors, accepted = time.time(), 0, 0, 0
    while n < 100 or (n < 600 and time.time() - t0 < BUDGET_S):  # at least 100 cases, then time-bounded
        argv = _random_argv(rng, keys)
        n += 1
        try:
            spec = parse_run(argv)
        except ConfigError as e:
            assert str(e).strip(), argv
            errors += 1
            continue
        _check_accepted(spec)
        accepted += 1
    assert n >= 100 and errors > 0 and accepted > 0


def _random_yaml(rng: random.Random, keys) -> bytes:
    kind = rng.random()
    if kind < 0.2:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))  # not text at all
    if kind < 0.3:
        return rng.choice([b"- a\n- b\n", b"just a string", b"{{{", b"a: [1, 2", b"a: b: c", b"\t x: 1",
                           b"!!python/object:os.system ls", b"[" * 5000, b"key: &a [*a]", b"? [a]\n: b\n",
                           b"1: 2\n", b"null: 1\n"])
    lines = []
    for _ in range(rng.randint(1, 6)):
        key = rng.choice(keys)
        val = rng.choice(VALUES + ["[1, 2]", "{a: 1}", "- x", "!!binary aGVsbG8=", "yes", "no", "off", "~",
                                   "2026-01-01", "'quoted'", "[[1]]", "1e3"])
        lines.append(f"{key}: {val}" if rng.random() < 0.9 else f"{key}:")
    return "\n".join(lines).encode("utf-8", errors="replace")


def test_random_yaml_files_give_config_errors_or_valid_specs(tmp_path):
    rng = random.Random(1)
    keys = _keys()
    t0, n, errors = time.time(), 0, 0
    path = tmp_path / "run.yaml"
    while n < 100 or (n < 400 and time.time() - t0 < BUDGET_S):
        path.write_bytes(_random_yaml(rng, keys))
        n += 1
        try:
            spec = parse_run(["--config", str(path), "--pretrained_teacher_model", "t"])
        except ConfigError as e:
            assert str(e).strip()
            errors += 1
            continue
        _check_accepted(spec)
    assert n >= 100 and errors > n // 4


def test_cli_turns_every_config_error_into_exit_2(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_bytes(b"\xff\xfe\x00garbage")
    for argv in (["distill", "--config", str(tmp_path / "bad.yaml")],
                 ["distill", "--learning_rate", "nan", "--pretrained_teacher_model", "t"],
                 ["distill", "--method", "lcm", "teacher", "--pretrained_teacher_model", "t"],
                 ["distill", "--resolution", "[1, 2]", "--pretrained_teacher_model", "t"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("fewstep distill: error: ") and "Traceback" not in err


def test_yaml_gotchas_are_named():
    """`mixed_precision: no` is the boolean false in YAML; a list where a number belongs is not 0 or 1."""
    import yaml

    from fewstep.config import resolve

    with pytest.raises(ConfigError, match='quote the value'):
        resolve(yaml.safe_load("mixed_precision: no"), method_configs())
    with pytest.raises(ConfigError, match="--train_batch_size expects int"):
        resolve(yaml.safe_load("train_batch_size: true"), method_configs())
    with pytest.raises(ConfigError, match="finite"):
        resolve({"learning_rate": "inf"}, method_configs())


# ---- the data layer ---------------------------------------------------------------------------

def _png(rng: np.random.Generator, size=24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _corrupt(rng: np.random.Generator, data: bytes) -> bytes:
    """One of: truncated, bytes flipped in the body, random bytes, empty, a valid header then junk."""
    k = int(rng.integers(0, 5))
    if k == 0:
        return data[: int(rng.integers(0, max(1, len(data) - 1)))]
    if k == 1:
        b = bytearray(data)
        for i in rng.integers(8, len(b), 20):
            b[i] = int(rng.integers(0, 256))
        return bytes(b)
    if k == 2:
        return rng.integers(0, 256, int(rng.integers(1, 500)), dtype=np.uint8).tobytes()
    if k == 3:
        return b""
    return data[:33] + b"\x00" * 100


def _drain_map(ds) -> dict:
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    good, skipped = 0, {}
    for batch in loader:
        good += len(batch["caption"])
        for c, n in batch["skipped"].items():
            skipped[c] = skipped.get(c, 0) + n
        if batch["caption"]:
            assert torch.isfinite(batch["pixel_values"]).all()
            assert batch["pixel_values"].abs().max() <= 1.0
    return {"good": good, "skipped": skipped}


def _spec(**kw):
    argv = ["--pretrained_teacher_model", "t", "--resolution", "16"]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    return parse_run(argv).train


def test_random_corrupt_images_in_a_folder_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    n, corrupt, t0 = 40, 0, time.time()
    for i in range(n):
        data = _png(rng)
        bad = rng.random() < 0.5
        if bad:
            data2 = _corrupt(rng, data)
            # A flip may land in bytes PIL ignores (e.g. a CRC it does not check): decode to know.
            try:
                Image.open(io.BytesIO(data2)).convert("RGB")
            except Exception:
                corrupt += 1
            data = data2
        (tmp_path / f"{i:03d}.png").write_bytes(data)
        (tmp_path / f"{i:03d}.txt").write_text(f"a photo {i}")
    got = _drain_map(build_dataset(_spec(train_data_dir=tmp_path)))
    assert got["good"] + sum(got["skipped"].values()) == n
    assert got["skipped"].get("corrupt image", 0) == corrupt and corrupt > 5
    assert set(got["skipped"]) <= {"corrupt image"}
    assert time.time() - t0 < 60


def _csv_field(rng: random.Random) -> str:
    return rng.choice(["", "a.png", "missing.png", "../../etc/passwd", '"quoted, comma"', "ü.png", "a photo",
                       '"unterminated', " ", "\\", "a.png,extra"])


@pytest.mark.parametrize("seed", range(40))
def test_random_csv_rows_are_skipped_by_cause_or_rejected_cleanly(tmp_path, seed):
    """Broken rows (missing files, empty captions, short rows, stray quotes) are skipped and counted;
    a metadata file without the needed columns is a ConfigError."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    (tmp_path / "a.png").write_bytes(_png(nrng))
    (tmp_path / "ü.png").write_bytes(_corrupt(nrng, _png(nrng)))
    lines = ["image,text" if rng.random() < 0.9 else rng.choice(["img,caption", "", "text"])]
    for _ in range(rng.randint(1, 12)):
        lines.append(",".join(_csv_field(rng) for _ in range(rng.choice([1, 2, 2, 2, 3]))))
    (tmp_path / "meta.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        ds = build_dataset(_spec(train_data_dir=tmp_path / "meta.csv"))
    except ConfigError as e:
        assert str(e).strip()
        return
    got = _drain_map(ds)
    assert got["good"] + sum(got["skipped"].values()) == len(ds)


def test_random_corrupt_tar_shards_are_skipped_and_counted(tmp_path):
    rng, nrng = random.Random(3), np.random.default_rng(3)
    for s in range(6):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(4):
                members = {"png": _png(nrng), "txt": f"a photo {s} {i}".encode()}
                r = rng.random()
                if r < 0.2:
                    members["png"] = _corrupt(nrng, members["png"])
                elif r < 0.3:
                    del members["txt"]
                elif r < 0.4:
                    del members["png"]
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"k{s}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        if s >= 4:  # two shards damaged as files: truncated mid-member, random bytes
            raw = raw[: len(raw) // 2] if s == 4 else nrng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
        (tmp_path / f"{s}.tar").write_bytes(raw)
    ds = build_dataset(_spec(train_shards_path_or_url=str(tmp_path / "{0..5}.tar")))
    items = list(ds)
    good = [x for x in items if "_bad" not in x]
    causes = {}
    for x in items:
        if "_bad" in x:
            causes[x["_bad"]] = causes.get(x["_bad"], 0) + 1
    assert good and causes and all(torch.isfinite(x["pixel_values"]).all() for x in good)
    assert set(causes) <= {"corrupt image", "missing caption", "missing image", "unreadable shard"}
    assert "unreadable shard" in causes  # the random-bytes shard
