"""Training data: one interface over image folders, metadata files, WebDataset shards and HF datasets.

Every source yields ``{"pixel_values": (3, R, R) in [-1, 1], "caption": str}`` per sample, plus
``"meta"``: the metadata file's other columns as strings (e.g. ``seed`` and ``rand_device`` of teacher
data written by ``fewstep generate``), which :func:`collate` turns into ``batch["meta"][column]`` lists.

A bad sample (unreadable or too large image, missing caption or one that is not UTF-8, tiny image) is
counted by cause and, in training (``replace_bad`` / ``carry_bad``, set by the trainer), replaced, so
every batch has the size asked for: a map-style data set serves another sample drawn from (seed, epoch,
index) in its place; a stream serves its next good item (see :mod:`.stream`). The skipped one travels with its replacement (``_replaced`` / ``_skipped``) so that
:func:`collate` counts it; the log and the stop rule (``--max_bad_fraction``) see every one.
"""

from __future__ import annotations

import csv
import json
import logging
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from .transforms import NOT_UTF8, BadSample, ImageTransform  # noqa: F401  (BadSample: re-exported)

log = logging.getLogger("fewstep.data")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # a GIF gives its first frame
CAPTION_KEYS = ("text", "prompt", "caption")
REPLACE_TRIES = 32  # draws for a good replacement before a bad sample is served as such (a short batch)


class Unreadable:
    """A caption (or metadata row) that could not be decoded: falsy like a missing caption, and
    carrying the cause and place for the skip count."""

    def __init__(self, cause: str, where: str):
        self.cause, self.where = cause, where

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Unreadable({self.cause!r}, {self.where!r})"


def read_caption(path: Path) -> str | Unreadable:
    """A caption sidecar's text; invalid UTF-8 is reported (with the byte offset), never guessed."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        return Unreadable(NOT_UTF8, f"{path} (invalid byte at offset {e.start})")


def _has_bad_bytes(value) -> bool:
    """True for text read with errors="surrogateescape" that held bytes invalid in UTF-8."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_bad_bytes(k) or _has_bad_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_bad_bytes(v) for v in value)
    return False


def _caption_key(row: dict, wanted: str, where: str) -> str:
    if wanted in row:
        return wanted
    # Only the default name falls back to the usual ones: a column the user named must exist.
    for k in CAPTION_KEYS if wanted == "text" else ():
        if k in row:
            return k
    raise ConfigError(f"{where}: no caption column {wanted!r} (columns: {', '.join(map(str, row))}); "
                      "set --caption_column")


def _image_key(row: dict, wanted: str, where: str) -> str:
    for k in (wanted, "file_name", "image", "path") if wanted == "image" else (wanted,):
        if k in row:
            return k
    raise ConfigError(f"{where}: no image column {wanted!r} (columns: {', '.join(map(str, row))}); set --image_column")


Record = tuple[str, "str | None", dict[str, str]]  # (image path, caption, other metadata columns)


def read_metadata(path: Path, image_column: str, caption_column: str, base_path: str | None = None) -> list[Record]:
    """Rows of a CSV / JSON / JSONL metadata file as (image path, caption, other columns); image paths are
    relative to the file, or to ``base_path`` (DiffSynth-Studio's --dataset_base_path; "" is the working
    folder)."""
    # Bytes that are not UTF-8 are kept as lone surrogates ("surrogateescape"), so one bad row is skipped
    # and counted as "caption not UTF-8" instead of stopping the whole file.
    lines: list[int] = []  # line number of each row, for the skip message
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            if _has_bad_bytes(list(reader.fieldnames or [])):
                raise ConfigError(f"{path}: the header row is not UTF-8 text; save the file as UTF-8")
            rows = []
            for r in reader:
                rows.append(r)
                lines.append(reader.line_num)
    elif path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{i + 1} is not valid JSON: {e}") from None
                lines.append(i + 1)
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8-sig", errors="surrogateescape"))
        lines = list(range(1, len(rows) + 1)) if isinstance(rows, list) else []
    else:
        raise ConfigError(f"{path}: metadata must be .csv, .json or .jsonl")
    if not rows:
        raise ConfigError(f"{path} has no rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{path}: every row must be an object of column: value")
    ik, ck = _image_key(rows[0], image_column, str(path)), _caption_key(rows[0], caption_column, str(path))
    base = path.parent if base_path is None else Path(base_path)
    out: list[Record] = []
    for r, n in zip(rows, lines):
        if _has_bad_bytes(r):
            out.append(("", Unreadable(NOT_UTF8, f"{path}:{n} (a row that is not UTF-8)"), {}))
            continue
        # csv.DictReader files cells beyond the header under the key None: they are not metadata.
        out.append((str(base / r[ik]) if r.get(ik) else "", r.get(ck),
                    {k: str(v) for k, v in r.items() if k not in (ik, ck, None) and v is not None}))
    return out


# Caption sidecars looked for next to each image when --caption_extension is not given: diffusers' and
# most tools' .txt, then kohya's .caption.
CAPTION_EXTS = (".txt", ".caption")


def scan_folder(root: Path, image_column: str, caption_column: str, caption_extension: str | None = None,
                base_path: str | None = None) -> list[Record]:
    """An image folder: metadata.jsonl / metadata.csv if present, else images with caption sidecars
    (``img.png`` + ``img.txt``, or kohya's ``img.caption``; ``caption_extension`` picks one)."""
    for name in ("metadata.jsonl", "metadata.csv", "metadata.json"):
        if (root / name).is_file():
            return read_metadata(root / name, image_column, caption_column, base_path)
    exts = CAPTION_EXTS if not caption_extension else ("." + caption_extension.strip().lstrip("."),)
    records = []
    other: Counter = Counter()
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            side = next((p.with_suffix(e) for e in exts if p.with_suffix(e).is_file()), None)
            records.append((str(p), read_caption(side) if side else None, {}))
        elif p.is_file() and p.suffix.lower() not in (*exts, ".txt", ".caption", ".json", ".jsonl", ".csv", ".md"):
            other[p.suffix.lower() or p.name] += 1
    if other:  # said once, so that images in a format read by nothing here are never dropped silently
        log.warning("%s: %d file(s) that are neither images (%s) nor captions are not used: %s", root,
                    sum(other.values()), " ".join(IMAGE_EXTS), ", ".join(f"{k} {n}" for k, n in other.most_common()))
    return records


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Map-style (image path, caption) records; transforms seeded per (seed, epoch, index)."""

    replace_bad = False  # the trainer turns it on: a bad sample is served with a replacement

    def __init__(self, records: list[Record], transform: ImageTransform, seed: int = 0):
        self.records, self.transform, self.seed, self.epoch = records, transform, seed, 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> dict[str, Any]:
        path, caption, meta = self.records[index]
        if isinstance(caption, Unreadable):
            raise BadSample(caption.cause, caption.where)
        if caption is None or not str(caption).strip():  # an empty CSV cell or .txt file is a data error
            raise BadSample("missing caption", path)
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % (2**63))
        return {**self.transform.open(path, gen), "caption": str(caption), "meta": meta}

    def __getitem__(self, index: int):
        epoch, index = divmod(index, len(self))  # see EpochSampler: indices carry the epoch
        self.epoch = epoch
        try:
            return self.load(index)
        except BadSample as e:
            bad = {"_bad": e.cause, "_where": e.where}
        if not self.replace_bad:
            return bad
        # A replacement drawn from (seed, epoch, index) alone: the same in a resumed run and in every
        # data-loader worker. Only the sample at its own position is counted; failed draws are not.
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{epoch}/{index}".encode()))
        for _ in range(REPLACE_TRIES):
            j = int(torch.randint(len(self), (1,), generator=g))
            try:
                return {**self.load(j), "_replaced": [(bad["_bad"], bad["_where"])]}
            except BadSample:
                continue
        return bad


def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack good samples; count bad ones by cause: served as such (``_bad``), replaced by another sample
    of a map-style set (``_replaced``), or skipped by a stream before this item (``_skipped``).
    ``positions``: the data positions the batch consumed (a stream's skipped items are positions too)."""
    good = [s for s in samples if "_bad" not in s]
    listed = [(s["_bad"], s["_where"]) for s in samples if "_bad" in s]
    listed += [x for s in good for k in ("_replaced", "_skipped") for x in s.get(k, ())]
    bad = Counter(c for c, _ in listed)
    batch: dict[str, Any] = {"skipped": dict(bad), "skipped_example": listed[0][1] if listed else None,
                             "positions": len(samples) + sum(len(s.get("_skipped", ())) for s in samples)}
    if samples and "_worker" in samples[0]:  # streamed: which loader worker made this batch (resume)
        batch["worker"] = samples[0]["_worker"]
    if good:
        batch["caption"] = [s["caption"] for s in good]
        for k in good[0]:
            if k not in batch and isinstance(good[0][k], torch.Tensor) and not k.startswith("_"):
                batch[k] = torch.stack([s[k] for s in good])
        keys = sorted({k for s in good for k in s.get("meta", {})})
        if keys:
            batch["meta"] = {k: [s.get("meta", {}).get(k) for s in good] for k in keys}
    else:
        batch["caption"] = []
    return batch


def build_dataset(cfg, for_rank: int = 0, world: int = 1):
    """The data set named by the config (exactly one source)."""
    transform = ImageTransform(cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.interpolation_type)
    if cfg.train_data_dir:
        root = Path(cfg.train_data_dir)
        if not root.exists():
            raise ConfigError(f"--train_data_dir {root}: no such file or folder")
        base = getattr(cfg, "dataset_base_path", None)
        records = (read_metadata(root, cfg.image_column, cfg.caption_column, base) if root.is_file()
                   else scan_folder(root, cfg.image_column, cfg.caption_column,
                                    getattr(cfg, "caption_extension", None), base))
        if not records:
            raise ConfigError(
                f"--train_data_dir {root} holds no images ({', '.join(IMAGE_EXTS)}) and no metadata.jsonl/csv; "
                "put images with .txt captions there or point at a metadata file"
            )
        if cfg.max_train_samples:
            records = records[: cfg.max_train_samples]
        return ImageCaptionDataset(records, transform, cfg.seed)
    if cfg.train_shards_path_or_url:
        from .shards import ShardDataset

        return ShardDataset(cfg.train_shards_path_or_url, transform, cfg.seed, cfg.max_train_samples,
                            cfg.data_resampling)
    if cfg.file_list:
        from .filelist import FileListDataset

        return FileListDataset(cfg.file_list, transform, cfg.seed, cfg.max_train_samples, cfg.data_resampling)
    if cfg.dataset_name:
        return _hf_dataset(cfg, transform)
    if cfg.cache_dir:
        from .cache import CachedDataset

        return CachedDataset(cfg.cache_dir, cfg.max_train_samples)
    raise ConfigError("no training data: pass --train_data_dir, --train_shards_path_or_url, --file_list, "
                      "--dataset_name or --cache_dir")


class _HFDataset(ImageCaptionDataset):
    """A Hugging Face ``datasets.Dataset``: images as decoded PIL images, paths, or {"bytes": ...}."""

    def __init__(self, ds, image_column, caption_column, transform, seed):
        super().__init__([], transform, seed)
        self.ds, self.ic, self.cc = ds, image_column, caption_column

    def __len__(self):
        return len(self.ds)

    def load(self, index):
        import io

        from PIL import Image

        where = f"{self.ic} of row {index}"
        try:
            row = self.ds[index]  # datasets decodes images on access: a broken one raises here
        except Exception:
            raise BadSample("corrupt image", where) from None
        caption = row.get(self.cc)
        if caption is None or not str(caption).strip():
            raise BadSample("missing caption", f"row {index}")
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % (2**63))
        img = row[self.ic]
        if isinstance(img, str):
            return {**self.transform.open(img, gen), "caption": str(caption)}
        if isinstance(img, dict) and img.get("bytes") is not None:
            try:
                img = Image.open(io.BytesIO(img["bytes"]))
                img.load()
            except Exception:
                raise BadSample("corrupt image", where) from None
        if img is None:
            raise BadSample("missing image", where)
        return {**self.transform.apply(img, gen, where), "caption": str(caption)}


def _hf_dataset(cfg, transform):
    """``--dataset_name``: a folder written by ``save_to_disk``, or anything ``load_dataset`` takes
    (a hub name where the hub is reachable, a local data folder, a loading script)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("--dataset_name needs the `datasets` package: pip install 'fewstep[hf]'") from None
    p = Path(cfg.dataset_name).expanduser()
    try:
        if p.is_dir() and any((p / f).is_file() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise ConfigError(f"--dataset_name {p} has no 'train' split (splits: {', '.join(ds)})")
                ds = ds["train"]
        else:
            ds = datasets.load_dataset(cfg.dataset_name, split="train")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--dataset_name {cfg.dataset_name}: could not load ({type(e).__name__}: {e})") from None
    for col in (cfg.image_column, cfg.caption_column):
        if col not in ds.column_names:
            raise ConfigError(f"--dataset_name {cfg.dataset_name} has no column {col!r}; columns: {ds.column_names}; "
                              "set --image_column / --caption_column")
    if cfg.max_train_samples:
        ds = ds.select(range(min(cfg.max_train_samples, len(ds))))
    return _HFDataset(ds, cfg.image_column, cfg.caption_column, transform, cfg.seed)
