"""WebDataset shards: local paths with brace expansion, ``pipe:`` commands and http(s) URLs,
streamed without downloading the data set first."""

from __future__ import annotations

import io
import zlib

import torch

from ..config import ConfigError
from .sources import BadSample

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
TEXT_KEYS = ("text", "txt", "caption")


def expand_urls(spec: str) -> list[str]:
    try:
        import braceexpand
    except ImportError:
        raise ConfigError("--train_shards_path_or_url needs webdataset: pip install 'fewstep[webdataset]'") from None
    urls = []
    for part in spec.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    return urls


class ShardDataset(torch.utils.data.IterableDataset):
    """Streams samples; shards are split across ranks and workers so none is read twice per epoch."""

    def __init__(self, spec: str, transform, seed: int = 0, max_samples: int | None = None):
        self.urls = expand_urls(spec)
        if not self.urls:
            raise ConfigError(f"--train_shards_path_or_url {spec!r} names no shard")
        self.transform, self.seed, self.max_samples, self.epoch = transform, seed, max_samples, 0
        self.rank, self.world = 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_rank(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def my_shards(self) -> list[str]:
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        urls = [self.urls[i] for i in order.tolist()]
        slot, nslots = self.rank * nworkers + wid, self.world * nworkers
        return urls[slot::nslots]

    def __iter__(self):
        import webdataset as wds

        count = 0
        for url in self.my_shards():
            try:
                stream = wds.tariterators.url_opener([{"url": url}], handler=wds.reraise_exception)
                samples = wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(stream))
                for i, sample in enumerate(samples):
                    yield self._decode(sample, i)
                    count += 1
                    if self.max_samples and count * self.world >= self.max_samples:
                        return
            except Exception as e:  # unreadable shard: counted, the stream goes on
                yield {"_bad": "unreadable shard", "_where": f"{url} ({type(e).__name__})"}

    def _decode(self, sample: dict, i: int):
        from PIL import Image

        where = f"{sample.get('__url__', '?')}#{sample.get('__key__', i)}"
        try:
            img_key = next((k for k in IMAGE_KEYS if k in sample), None)
            txt_key = next((k for k in TEXT_KEYS if k in sample), None)
            if img_key is None:
                raise BadSample("missing image", where)
            if txt_key is None:
                raise BadSample("missing caption", where)
            seed = ((self.seed * 1_000_003 + self.epoch) * 4_294_967_296 + zlib.crc32(where.encode())) % (2**63)
            gen = torch.Generator().manual_seed(seed)
            try:
                with Image.open(io.BytesIO(sample[img_key])) as im:
                    im.load()
                    x = self.transform.apply(im, gen, where)
            except BadSample:
                raise
            except Exception:
                raise BadSample("corrupt image", where) from None
            return {**x, "caption": sample[txt_key].decode("utf-8").strip()}
        except BadSample as e:
            return {"_bad": e.cause, "_where": e.where}
