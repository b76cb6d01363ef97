"""Data sources: WebDataset shards (with broken ones), metadata files, skipped samples counted by cause."""

import io
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
def shards(tmp_path):
    good = [(f"s{i:03d}", {"png": _png(seed=i), "txt": f"a handwritten digit {i % 10}".encode()}) for i in range(6)]
    write_shard(tmp_path / "000.tar", good[:3] + [("bad1", {"png": b"not an image", "txt": b"x"})])
    write_shard(tmp_path / "001.tar", good[3:] + [("bad2", {"jpg": _png(seed=9)})])  # no caption
    (tmp_path / "002.tar").write_bytes(b"this is not a tar file")
    return tmp_path


def test_shards_stream_skip_and_count(shards):
    spec = parse_run(["--pretrained_teacher_model", "x", "--train_shards_path_or_url",
                      str(shards / "{000..002}.tar"), "--resolution", "32"])
    ds = build_dataset(spec.train)
    samples = list(ds)
    good = [s for s in samples if "_bad" not in s]
    causes = sorted(s["_bad"] for s in samples if "_bad" in s)
    assert len(good) == 6 and good[0]["pixel_values"].shape == (3, 32, 32)
    assert causes == ["corrupt image", "missing caption", "unreadable shard"]
    batch = collate(samples)
    assert batch["pixel_values"].shape[0] == 6 and len(batch["caption"]) == 6
    assert batch["skipped"] == {"corrupt image": 1, "missing caption": 1, "unreadable shard": 1}


def test_shards_split_across_ranks_without_overlap(shards):
    spec = parse_run(["--pretrained_teacher_model", "x", "--train_shards_path_or_url",
                      str(shards / "{000..001}.tar"), "--resolution", "32"])
    seen = []
    for rank in range(2):
        ds = build_dataset(spec.train)
        ds.set_rank(rank, 2)
        seen.append({s["caption"] + str(float(s["pixel_values"].sum())) for s in ds if "_bad" not in s})
    assert seen[0] and seen[1] and not seen[0] & seen[1] and len(seen[0] | seen[1]) == 6


def test_training_on_shards_with_broken_samples(tiny_teacher, shards, tmp_path):
    args = run_args(tiny_teacher, shards, tmp_path / "o", max_train_steps=2)
    i = args.index("--train_data_dir")
    args[i:i + 2] = ["--train_shards_path_or_url", str(shards / "{000..002}.tar")]
    assert main(["distill", *args]) == 0
    assert (tmp_path / "o" / "unet" / "config.json").is_file()


def test_metadata_csv_and_missing_captions(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "b.png").write_bytes(_png(seed=1))
    (tmp_path / "meta.csv").write_text("image,prompt\na.png,a photo of a cat\nb.png,\n")
    spec = parse_run(["--pretrained_teacher_model", "x", "--train_data_dir", str(tmp_path / "meta.csv"),
                      "--resolution", "32"])
    ds = build_dataset(spec.train)
    assert len(ds) == 2 and ds[0]["caption"] == "a photo of a cat"
    assert torch.is_tensor(ds[0]["pixel_values"])
    assert ds[1]["_bad"] == "missing caption"


def test_mostly_broken_data_stops_with_cause_and_example(tiny_teacher, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(80):
        (folder / f"{i:03d}.png").write_bytes(_png(seed=i) if i % 4 == 0 else b"garbage")
        (folder / f"{i:03d}.txt").write_text("a photo of a cat")
    # Refused before any model loads (exit 2), as --dry_run refuses it: 48 of the first 64 samples are bad
    assert main(["distill", *run_args(tiny_teacher, folder, tmp_path / "o", train_batch_size=8,
                                      max_train_steps=20)]) == 2
    msg = capsys.readouterr().err
    assert "unusable" in msg and "corrupt image" in msg and str(folder) in msg
    assert not (tmp_path / "o").exists()


def test_zero_usable_samples(tiny_teacher, tmp_path, capsys):
    folder = tmp_path / "nocaps"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(_png(seed=i))  # images without captions
    assert main(["distill", *run_args(tiny_teacher, folder, tmp_path / "o", train_batch_size=2)]) == 2
    err = capsys.readouterr().err
    assert "no usable sample" in err and "missing caption" in err


def test_metadata_extra_columns_reach_the_batch(tmp_path):
    """Columns beyond image and caption (e.g. the seed and rand_device of `fewstep generate` rows)
    travel with each sample and are collated into batch["meta"]."""
    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(_png(seed=i))
    (tmp_path / "metadata.csv").write_text(
        "image,prompt,seed,rand_device\n0.png,a cat,7,cpu\n1.png,a dog,11,cpu\n")
    spec = parse_run(["--pretrained_teacher_model", "x", "--train_data_dir", str(tmp_path), "--resolution", "32"])
    ds = build_dataset(spec.train)
    batch = collate([ds[0], ds[1]])
    assert batch["caption"] == ["a cat", "a dog"]
    assert batch["meta"] == {"rand_device": ["cpu", "cpu"], "seed": ["7", "11"]}


def test_initial_noise_is_regenerable():
    from fewstep.diffusion.noise import batch_noise, initial_noise

    a = initial_noise(123, "cpu", (4, 8, 8))
    b = batch_noise(["123", 5], ["cpu", "cpu"], (4, 8, 8))
    assert torch.equal(a, b[0]) and not torch.equal(b[0], b[1])
    # the same draw as diffusers' pipelines: torch.randn from Generator("cpu").manual_seed(seed)
    assert torch.equal(a, torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(123))[0])


def test_hf_dataset_from_disk_with_broken_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "ok.png").write_bytes(_png())
    rows = {"image": [{"bytes": _png(seed=1), "path": None}, {"bytes": b"broken", "path": None},
                      {"bytes": _png(seed=2), "path": None}],
            "text": ["a photo of a cat", "a photo of a dog", None]}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(decode=False), "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    built = build_dataset(parse_run(["--pretrained_teacher_model", "x", "--dataset_name", str(tmp_path / "hf"),
                                     "--resolution", "32"]).train)
    assert len(built) == 3
    assert built[0]["caption"] == "a photo of a cat" and built[0]["pixel_values"].shape == (3, 32, 32)
    assert built[1]["_bad"] == "corrupt image" and built[2]["_bad"] == "missing caption"
    with pytest.raises(Exception, match="no column 'prompt'"):
        build_dataset(parse_run(["--pretrained_teacher_model", "x", "--dataset_name", str(tmp_path / "hf"),
                                 "--caption_column", "prompt"]).train)


def test_named_metadata_columns_must_exist(tmp_path):
    """The default column names fall back to the usual ones (text → prompt/caption, image →
    file_name/path); a column the user named explicitly is never silently replaced by another."""
    from fewstep.config import ConfigError
    from fewstep.data.sources import read_metadata

    meta = tmp_path / "m.csv"
    meta.write_text("file_name,prompt,seed\na.png,a cat,1\n")
    assert read_metadata(meta, "image", "text") == [(str(tmp_path / "a.png"), "a cat", {"seed": "1"})]
    with pytest.raises(ConfigError, match="no caption column 'caption'"):
        read_metadata(meta, "image", "caption")
    with pytest.raises(ConfigError, match="no image column 'img'"):
        read_metadata(meta, "img", "prompt")
