"""Streamed data (WebDataset shards, PaddleMIX file lists): worker/rank splits, resampling, exact
resume without decoding again, SDXL original sizes from shard JSON."""

import base64
import gzip
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.data import build_dataset, collate


def _png(size=40, seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def many_shards(tmp_path):
    """4 shards × 5 samples, captions "a photo of a cat sNN"."""
    for s in range(4):
        write_shard(tmp_path / f"{s:03d}.tar", [
            (f"k{s}{i}", {"png": _png(seed=10 * s + i), "txt": f"a photo of a cat s{s}{i}".encode()})
            for i in range(5)])
    return str(tmp_path / "{000..003}.tar")


def _spec(*extra):
    return parse_run(["--pretrained_teacher_model", "x", "--resolution", "32", *extra]).train


def _captions(loader, n=None):
    out = []
    for i, batch in enumerate(loader):
        if n is not None and i == n:
            break
        out.append(batch)
    return out


def test_workers_and_ranks_split_shards_without_duplicates(many_shards):
    seen = []
    for rank in range(2):
        ds = build_dataset(_spec("--train_shards_path_or_url", many_shards))
        ds.set_rank(rank, 2)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
        seen += [c for b in loader for c in b["caption"]]
    assert len(seen) == 20 and len(set(seen)) == 20  # every sample once across 2 ranks × 2 workers


def test_stream_resume_skips_exactly_what_was_consumed(many_shards):
    """Consume 3 batches from 2 workers, record per-worker counts as the trainer does, then a fresh
    loader resumed from them serves exactly the rest."""
    ds = build_dataset(_spec("--train_shards_path_or_url", many_shards))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    first = _captions(loader, 3)
    pos = {}
    for b in first:
        pos[b["worker"]] = pos.get(b["worker"], 0) + len(b["caption"])
    ds2 = build_dataset(_spec("--train_shards_path_or_url", many_shards))
    ds2.set_resume(pos, step=3)
    # the same number of workers as before: positions are per worker
    rest = [c for b in torch.utils.data.DataLoader(ds2, batch_size=2, num_workers=2, collate_fn=collate)
            for c in b["caption"]]
    before = [c for b in first for c in b["caption"]]
    assert len(before) == 6 and not set(before) & set(rest)
    assert sorted(before + rest) == sorted(f"a photo of a cat s{s}{i}" for s in range(4) for i in range(5))


def test_skipped_items_are_not_decoded(many_shards):
    ds = build_dataset(_spec("--train_shards_path_or_url", many_shards))
    ds.set_resume({0: 15}, step=7)
    calls = []
    orig = ds.decode
    ds.decode = lambda raw: calls.append(raw["__key__"]) or orig(raw)
    out = list(ds)
    assert len(out) == 5 and len(calls) == 5  # 15 skipped by reading the tar only


def test_resampling_is_endless_seeded_and_fresh_after_resume(many_shards):
    def draw(rank=0, step=0, n=30):
        ds = build_dataset(_spec("--train_shards_path_or_url", many_shards, "--data_resampling"))
        ds.set_rank(rank, 2)
        ds.set_resume({}, step)
        it = iter(ds)
        return [next(it)["caption"] for _ in range(n)]

    a = draw()
    assert len(a) == 30  # more than the 20 samples there are: an endless stream
    assert a == draw()  # seeded
    assert a != draw(rank=1) and a != draw(step=100)  # per rank, and fresh draws after a resume


def test_shard_json_original_size_reaches_sdxl_time_ids(tmp_path):
    write_shard(tmp_path / "0.tar", [("a", {"jpg": _png(64), "txt": b"a cat",
                                           "json": json.dumps({"original_height": 1024, "original_width": 768}).encode()}),
                                     ("b", {"jpg": _png(64), "txt": b"a dog", "json": b"{not json"})])
    ds = build_dataset(_spec("--train_shards_path_or_url", str(tmp_path / "0.tar"), "--center_crop"))
    a, b = list(ds)
    assert a["original_size"].tolist() == [1024, 768]
    assert b["original_size"].tolist() == [64, 64]  # unusable JSON: the image's own size


def test_pipe_urls_stream(many_shards, tmp_path):
    spec = "pipe:cat " + many_shards.replace("{000..003}", "{000..001}")
    ds = build_dataset(_spec("--train_shards_path_or_url", spec))
    assert len([s for s in ds if "_bad" not in s]) == 10


# ---- PaddleMIX file lists ----------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def file_list(tmp_path):
    d = tmp_path / "fl"
    d.mkdir()
    # laion400m layout: caption \t (ignored) \t base64 image
    lines400 = [f"a photo of a cat {i}\tx\t{_b64(_png(seed=i))}" for i in range(6)]
    lines400 += ["\tx\t" + _b64(_png()),  # missing caption
                 "a photo of a dog\tx\t" + _b64(b"not an image"),  # corrupt image
                 "just one column"]  # malformed
    with gzip.open(d / "laion400m_part0.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines400) + "\n")
    # laion_aes layout: JSON caption in column 3, image in column 6
    aes = [f"id\turl\t{json.dumps({'caption_en': f'a handwritten digit {i}'})}\t-\t-\t{_b64(_png(seed=50 + i))}"
           for i in range(4)]
    (d / "laion_aes_part0.txt").write_text("\n".join(aes) + "\n")
    (d / "a.filelist").write_text("laion400m_part0.gz\n")
    (d / "b.filelist").write_text(f"{d / 'laion_aes_part0.txt'}\nmissing_part.txt\n")
    (d / "train.filelist.list").write_text("a.filelist 0.6\nb.filelist 0.4\n")
    return d / "train.filelist.list"


def test_paddlemix_file_list_layouts_weights_and_bad_lines(file_list):
    ds = build_dataset(_spec("--file_list", str(file_list)))
    items = list(ds)
    good = sorted(s["caption"] for s in items if "_bad" not in s)
    assert good == sorted([f"a photo of a cat {i}" for i in range(6)] + [f"a handwritten digit {i}" for i in range(4)])
    bad = sorted(s["_bad"] for s in items if "_bad" in s)
    assert bad == ["corrupt image", "malformed line", "missing caption", "unreadable data file"]
    assert all(s["pixel_values"].shape == (3, 32, 32) for s in items if "_bad" not in s)


def test_file_list_splits_across_ranks_and_resumes(file_list):
    seen = []
    for rank in range(2):
        ds = build_dataset(_spec("--file_list", str(file_list)))
        ds.set_rank(rank, 2)
        seen.append([s["caption"] for s in ds if "_bad" not in s])
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 10
    full = [s.get("caption", s.get("_bad")) for s in build_dataset(_spec("--file_list", str(file_list)))]
    ds = build_dataset(_spec("--file_list", str(file_list)))
    ds.set_resume({0: 5}, step=1)
    assert [s.get("caption", s.get("_bad")) for s in ds] == full[5:]


def test_file_list_errors_name_the_problem(tmp_path):
    (tmp_path / "l.txt").write_text("nowhere.filelist\n")
    with pytest.raises(Exception, match="does not exist"):
        build_dataset(_spec("--file_list", str(tmp_path / "l.txt")))
    (tmp_path / "a.filelist").write_text("x.txt\n")
    (tmp_path / "w.txt").write_text("a.filelist 0.5\na.filelist\n")
    with pytest.raises(Exception, match="weight on every line"):
        build_dataset(_spec("--file_list", str(tmp_path / "w.txt")))
    assert main(["distill", "--pretrained_teacher_model", "x", "--train_data_dir", "a", "--file_list", "b"]) == 2
    assert main(["distill", "--pretrained_teacher_model", "x", "--train_data_dir", "a", "--data_resampling"]) == 2


# ---- training on streams resumes exactly ---------------------------------------------------------

def _unet_state(out):
    from safetensors.torch import load_file

    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def test_training_on_shards_resumes_exactly(tiny_teacher, many_shards, tmp_path):
    def run(out, steps, **kw):
        args = run_args(tiny_teacher, "-", out, max_train_steps=steps, checkpointing_steps=2, **kw)
        i = args.index("--train_data_dir")
        args[i:i + 2] = ["--train_shards_path_or_url", many_shards]
        assert main(["distill", *args]) == 0

    run(tmp_path / "straight", 6)  # 6 steps × 2 = 12 of 20 samples: stays inside epoch 0 … then
    run(tmp_path / "cut", 4)  # … checkpoint at step 4, resume for 2 more
    run(tmp_path / "cut", 6, resume_from_checkpoint="latest")
    a, b = _unet_state(tmp_path / "straight"), _unet_state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
