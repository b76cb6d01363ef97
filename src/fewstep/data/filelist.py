"""PaddleMIX file lists (``--file_list``), the data format of PaddleMIX's LCM trainer.

The file list is a text file; each line names a *list file* and an optional sampling weight::

    data/laion_aes.filelist 0.7
    data/laion400m.filelist 0.3

Each list file names data files (one per line, optionally ``.gz``, relative paths resolved against
the list file's folder). Each data file holds one sample per line, tab-separated, the image as base64,
in one of the layouts PaddleMIX reads:

- ``laion400m`` (the data file's path contains "laion400m", or 3–5 columns): caption, (ignored), image;
- ``laion_aes`` (path contains "laion_aes", or a JSON object in column 3): column 3 is JSON with
  ``caption_en`` (or ``blip_caption_en``), column 6 the image;
- six or more columns otherwise: column 2 holds captions separated by "|" (one is drawn), column 6 the
  image.

Lists are interleaved by their weights (equal weights when none are given) with a seeded generator;
an epoch ends when every list is exhausted, or never with ``--data_resampling``. Data files are split
across ranks and workers like shards (:mod:`.stream`); lines PaddleMIX silently drops are counted here
as bad samples by cause.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import json
import zlib
from pathlib import Path

import torch

from ..config import ConfigError
from .stream import StreamDataset
from .transforms import TOO_LARGE, BadSample


def read_file_list(path: str) -> list[tuple[list[str], float | None]]:
    """[(data files of one list, weight or None)] from a PaddleMIX file list."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--file_list {path}: no such file")
    lists = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        lf = Path(parts[0]) if Path(parts[0]).is_absolute() else p.parent / parts[0]
        weight = None
        if len(parts) > 1:
            try:
                weight = float(parts[1])
            except ValueError:
                raise ConfigError(f"{path}:{n}: weight {parts[1]!r} is not a number") from None
            if weight < 0:
                raise ConfigError(f"{path}:{n}: weight must be >= 0")
        if not lf.is_file():
            raise ConfigError(f"{path}:{n}: list file {lf} does not exist")
        files = [ln.strip() for ln in lf.read_text(encoding="utf-8").splitlines() if ln.strip()]
        files = [f if Path(f).is_absolute() else str(lf.parent / f) for f in files]
        if files:
            lists.append((files, weight))
    if not lists:
        raise ConfigError(f"--file_list {path} names no data file")
    weights = [w for _, w in lists]
    if any(w is not None for w in weights) and (None in weights or sum(weights) <= 0):
        raise ConfigError(f"--file_list {path}: give a weight on every line (and not all zero), or on none")
    return lists


def parse_line(line: str, filename: str, gen: torch.Generator) -> tuple[str, bytes]:
    """(caption, image bytes) of one data line; raises BadSample with the cause."""
    cols = line.rstrip("\n").split("\t")
    where = filename
    aes = "laion_aes" in filename
    if not aes and "laion400m" not in filename and len(cols) >= 6:
        aes = cols[2].lstrip().startswith("{")
    if aes:
        if len(cols) < 6:
            raise BadSample("malformed line", where)
        try:
            meta = json.loads(cols[2])
            caption = str(meta.get("caption_en") or meta.get("blip_caption_en") or "")
        except (json.JSONDecodeError, AttributeError):
            raise BadSample("malformed line", where) from None
        b64 = cols[5]
    elif "laion400m" in filename or 3 <= len(cols) < 6:
        if len(cols) < 3:
            raise BadSample("malformed line", where)
        caption, b64 = cols[0], cols[2]
    elif len(cols) >= 6:
        options = [c.replace("\x01", "").strip() for c in cols[1].split("|") if c.strip()]
        caption = options[int(torch.randint(len(options), (1,), generator=gen))] if options else ""
        b64 = cols[5]
    else:
        raise BadSample("malformed line", where)
    if not caption.strip():
        raise BadSample("missing caption", where)
    try:
        return caption.strip(), base64.b64decode(b64, validate=False)
    except (binascii.Error, ValueError):
        raise BadSample("corrupt image", where) from None


class FileListDataset(StreamDataset):
    """Samples of a PaddleMIX file list, interleaved across lists by weight."""

    unreadable = "unreadable data file"

    def __init__(self, path: str, transform, seed: int = 0, max_samples: int | None = None,
                 resampling: bool = False):
        super().__init__(seed, max_samples, resampling)
        self.lists = read_file_list(path)
        self.transform = transform
        # The stream's units are whole lists here; each worker takes its slot of every list's files.
        self.units = [str(i) for i in range(len(self.lists))]

    def _files_of(self, i: int) -> list[str]:
        files = self.lists[i][0]
        wid, nworkers = self._worker()
        slot, nslots = self.rank * nworkers + wid, self.world * nworkers
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.seed + self.epoch + i))
        files = [files[j] for j in order.tolist()]
        if self.resampling:
            return files
        # Fewer files than worker slots: fall back to splitting lines (see _lines).
        return files[slot::nslots] if len(files) >= nslots else files

    def _lines(self, i: int):
        wid, nworkers = self._worker()
        slot, nslots = self.rank * nworkers + wid, self.world * nworkers
        files = self.lists[i][0]
        by_line = not self.resampling and len(files) < nslots
        for f in self._files_of(i):
            opener = gzip.open if f.endswith(".gz") else open
            try:
                with opener(f, "rb") as fh:
                    for n, raw in enumerate(fh):
                        if by_line and n % nslots != slot:
                            continue
                        yield f, n, raw
            except (OSError, EOFError, zlib.error) as e:  # missing or truncated file: one bad item, go on
                yield "!", f, e

    def _items(self):
        # Interleave the lists by weight; the base class carries bad items to the next good one.
        wid, _ = self._worker()
        skip = 0 if self.resampling else self.resume_items.get(wid, 0)
        weights = torch.tensor([w if w is not None else 1.0 for _, w in self.lists], dtype=torch.float64)
        g = torch.Generator().manual_seed(zlib.crc32(
            f"{self.seed}/{self.epoch}/{self.rank}/{wid}/{self.resume_step if self.resampling else 0}".encode()))
        streams = {i: self._lines(i) for i in range(len(self.lists))}
        count = 0
        while streams:
            live = list(streams)
            i = live[int(torch.multinomial(weights[live], 1, generator=g))]
            item = next(streams[i], None)
            if item is None:
                if self.resampling:
                    streams[i] = self._lines(i)  # an endless stream restarts the list
                else:
                    del streams[i]
                continue
            count += 1
            if count <= skip:
                continue
            f, n, raw = item
            if f == "!":
                out = {"_bad": self.unreadable, "_where": f"{n} ({type(raw).__name__}: {raw})"[:300]}
            else:
                out = self.decode((f, n, raw))
            out["_worker"] = wid
            yield out
            if self.max_samples and count * self.world >= self.max_samples:
                return

    def decode(self, raw) -> dict:
        from PIL import Image

        f, n, line = raw
        where = f"{f}:{n + 1}"
        gen = torch.Generator().manual_seed(self.item_seed(where))
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.decode("gb18030", errors="replace")
            try:
                caption, data = parse_line(text, f, gen)
            except BadSample as e:
                raise BadSample(e.cause, where) from None
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    x = self.transform.apply(im, gen, where)
            except BadSample:
                raise
            except Image.DecompressionBombError:
                raise BadSample(TOO_LARGE, where) from None
            except Exception:
                raise BadSample("corrupt image", where) from None
            return {**x, "caption": caption}
        except BadSample as e:
            return {"_bad": e.cause, "_where": e.where}
