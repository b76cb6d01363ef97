"""WebDataset shards: local paths with brace expansion, ``pipe:`` commands and http(s) URLs,
streamed without downloading the data set first (webdataset opens each shard as a stream).

A ``pipe:`` spec is a shell command that training runs as given: a config holding one is trusted input,
like a script. ``--dry_run`` prints those commands and never runs them.

Image keys jpg/png/jpeg/webp, caption keys text/txt/caption; an optional ``json`` member may carry
the image's size before any resizing (img2dataset's ``original_height`` / ``original_width``), which
becomes SDXL's ``original_size``.
"""

from __future__ import annotations

import io
import json

import torch

from ..config import ConfigError
from .stream import StreamDataset
from .transforms import NOT_UTF8, TOO_LARGE, BadSample

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp", "gif", "bmp", "tif", "tiff")
TEXT_KEYS = ("text", "txt", "caption")


def expand_urls(spec: str) -> list[str]:
    """``a/{000..009}.tar::b/x.tar`` → the list of shard URLs (webdataset's ``::`` separator)."""
    try:
        import braceexpand
    except ImportError:
        raise ConfigError("--train_shards_path_or_url needs webdataset: pip install 'fewstep[webdataset]'") from None
    urls = []
    for part in spec.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    return urls


class ShardDataset(StreamDataset):
    """Samples of WebDataset shards; shards split across ranks and workers (see :mod:`.stream`)."""

    def __init__(self, spec: str, transform, seed: int = 0, max_samples: int | None = None,
                 resampling: bool = False):
        super().__init__(seed, max_samples, resampling)
        self.units = expand_urls(spec)
        if not self.units:
            raise ConfigError(f"--train_shards_path_or_url {spec!r} names no shard")
        self.transform = transform

    @property
    def urls(self) -> list[str]:
        return self.units

    def drop_pipes(self) -> list[str]:
        """Remove the ``pipe:`` shards (shell commands) and return their commands: ``--dry_run`` prints
        them instead of running them."""
        cmds = [u[len("pipe:"):].strip() for u in self.units if u.startswith("pipe:")]
        self.units = [u for u in self.units if not u.startswith("pipe:")]
        return cmds

    def raw_items(self, url: str):
        import webdataset as wds

        stream = wds.tariterators.url_opener([{"url": url}], handler=wds.reraise_exception)
        yield from wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(stream))

    def decode(self, sample: dict) -> dict:
        from PIL import Image

        where = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
        try:
            img_key = next((k for k in IMAGE_KEYS if k in sample), None)
            txt_key = next((k for k in TEXT_KEYS if k in sample), None)
            if img_key is None:
                raise BadSample("missing image", where)
            if txt_key is None:
                raise BadSample("missing caption", where)
            try:
                caption = sample[txt_key].decode("utf-8-sig").strip()
            except UnicodeDecodeError as e:
                raise BadSample(NOT_UTF8, f"{where}.{txt_key} (invalid byte at offset {e.start})") from None
            if not caption:
                raise BadSample("missing caption", where)
            gen = torch.Generator().manual_seed(self.item_seed(where))
            try:
                with Image.open(io.BytesIO(sample[img_key])) as im:
                    im.load()
                    x = self.transform.apply(im, gen, where)
            except BadSample:
                raise
            except Image.DecompressionBombError:
                raise BadSample(TOO_LARGE, where) from None
            except Exception:
                raise BadSample("corrupt image", where) from None
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                    h, w = int(meta["original_height"]), int(meta["original_width"])
                    x["original_size"] = torch.tensor([h, w])
                except (ValueError, KeyError, TypeError):
                    pass  # no usable original size: the image's own size stands
            return {**x, "caption": caption}
        except BadSample as e:
            return {"_bad": e.cause, "_where": e.where}
