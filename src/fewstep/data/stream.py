"""Streamed (iterable) data sets: the splitting, epochs, resampling and exact resume that WebDataset
shards and PaddleMIX file lists share.

A stream is a list of *units* (shard files, or data files of a file list) read in order. Every
data-loader worker of every rank owns the units ``order[slot::slots]`` with ``slot = rank · workers +
worker``, so within an epoch no unit, hence no sample, is served twice across the whole job.

Each yielded item (a decoded sample, with the bad items just before it in ``_skipped``, or a ``_bad``
marker at the very end) carries ``_worker``, the id of the worker that produced it, so the trainer can
count how many items of each worker's stream it has consumed: a bad item takes no place in a batch.
On resume, each worker skips exactly that many items *without decoding them* (the tar or text is
still read, images are not), so the stream continues where it stopped: nothing repeated, nothing
skipped.

In resampling mode (``--data_resampling``, for endless streams), each worker draws units with
replacement from a generator seeded by (seed, rank, worker, resume step): an infinite stream whose
draws after a resume are fresh, and need no fast-forward through a long history.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch


class StreamDataset(torch.utils.data.IterableDataset):
    """Subclasses set ``self.units`` and implement :meth:`raw_items` (cheap, undecoded items of one
    unit) and :meth:`decode` (a raw item → sample dict or ``{"_bad": cause, "_where": ...}``)."""

    units: list[str]
    carry_bad = False  # the trainer turns it on: bad items ride with the next good one (full batches)

    def __init__(self, seed: int = 0, max_samples: int | None = None, resampling: bool = False):
        self.seed, self.max_samples, self.resampling = seed, max_samples, resampling
        self.epoch, self.rank, self.world = 0, 0, 1
        self.resume_items: dict[int, int] = {}  # worker id → items of this epoch already consumed
        self.resume_step = 0

    # ---- set by the trainer ------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_rank(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def set_resume(self, items_per_worker: dict[int, int], step: int) -> None:
        """Items of the current epoch consumed per worker (from the checkpoint), and the step resumed at."""
        self.resume_items = {int(k): int(v) for k, v in items_per_worker.items()}
        self.resume_step = step

    # ---- splitting ---------------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def my_units(self) -> list[str]:
        """This worker's units for this epoch: a seeded permutation, split by global worker slot."""
        wid, nworkers = self._worker()
        order = torch.randperm(len(self.units), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        units = [self.units[i] for i in order.tolist()]
        slot, nslots = self.rank * nworkers + wid, self.world * nworkers
        return units[slot::nslots]

    def _resampled_units(self) -> Iterator[str]:
        wid, nworkers = self._worker()
        g = torch.Generator().manual_seed(
            zlib.crc32(f"{self.seed}/{self.rank}/{wid}/{self.resume_step}".encode()))
        while True:
            yield self.units[int(torch.randint(len(self.units), (1,), generator=g))]

    def item_seed(self, where: str) -> int:
        """Seed of a sample's random transform: from (seed, epoch, sample id), not from the worker."""
        return ((self.seed * 1_000_003 + self.epoch) * 4_294_967_296 + zlib.crc32(where.encode())) % (2**63)

    # ---- iteration ---------------------------------------------------------------------------
    def raw_items(self, unit: str) -> Iterator:
        raise NotImplementedError

    def decode(self, raw) -> dict:
        raise NotImplementedError

    def __iter__(self):
        """Good items, each carrying the bad items the stream passed just before it (``_skipped``), so a
        batch is never short of a bad sample; bad items left at the end of the stream come alone."""
        if not self.carry_bad:
            yield from self._items()
            return
        pending: list = []
        for item in self._items():
            if "_bad" in item:
                pending.append(item)
                continue
            if pending:
                item["_skipped"] = [(b["_bad"], b["_where"]) for b in pending]
                pending = []
            yield item
        yield from pending

    def _items(self):
        """Every item of this worker's stream in order, bad ones as ``{"_bad": cause, "_where": ...}``."""
        wid, _ = self._worker()
        skip = 0 if self.resampling else self.resume_items.get(wid, 0)
        units = self._resampled_units() if self.resampling else self.my_units()
        count = 0
        for unit in units:
            try:
                for raw in self.raw_items(unit):
                    count += 1
                    if count <= skip:
                        continue  # consumed before the interruption: not decoded again
                    item = self.decode(raw)
                    item["_worker"] = wid
                    yield item
                    if self.max_samples and count * self.world >= self.max_samples:
                        return
            except Exception as e:  # unreadable unit: counted as one bad item, the stream goes on
                count += 1
                if count > skip:
                    yield {"_bad": self.unreadable, "_where": f"{unit} ({type(e).__name__}: {e})"[:300],
                           "_worker": wid}

    unreadable = "unreadable shard"
