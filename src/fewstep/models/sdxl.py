"""The SDXL family: two text encoders, pooled text embeddings and micro-conditioning time ids.

Conditioning as StableDiffusionXLPipeline builds it: penultimate hidden states of CLIPTextModel and
CLIPTextModelWithProjection concatenated, the second encoder's projected pooled output as
``text_embeds``, ``time_ids`` = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) (height
before width), and zeros as the unconditional input.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError
from .base import Cond, check_teacher_path
from .sd import SDBundle

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class SDXLBundle(SDBundle):
    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_parts = ("text_encoder", "text_encoder_2")
    micro_conditioning = True
    family_flags = ("is_sdxl",)  # PaddleMIX's train_lcm.py flag

    def __init__(self, root, parts, scheduler_config, vae_encode_batch_size=32, vae_is_fp16_safe=False,
                 use_fix_crop_and_size=False):
        super().__init__(root, parts, scheduler_config, vae_encode_batch_size)
        self.vae_is_fp16_safe = vae_is_fp16_safe
        self.use_fix_crop_and_size = use_fix_crop_and_size

    @staticmethod
    def matches(index: dict) -> bool:
        return "unet" in index and "text_encoder_2" in index

    @classmethod
    def load(cls, path, revision=None, vae_path=None, weights=True, vae_encode_batch_size=32, text_encoders=True,
             use_fix_crop_and_size=False, **family_options):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        root = check_teacher_path(path, revision)
        index = json.loads((Path(root) / "model_index.json").read_text())
        for part in PARTS:
            if part not in index:
                raise ConfigError(f"{root}/model_index.json has no {part!r}: not a Stable Diffusion XL pipeline")
        sched_cfg = DDPMScheduler.load_config(root, subfolder="scheduler")
        parts = {"tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
                 "tokenizer_2": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2")}
        vae_root, vae_sub = (vae_path, None) if vae_path else (root, "vae")
        f32 = torch.float32
        if weights:
            parts["unet"] = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=f32)
            parts["vae"] = AutoencoderKL.from_pretrained(vae_root, subfolder=vae_sub, torch_dtype=f32)
            parts["text_encoder"] = (CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=f32)
                                     if text_encoders else None)
            parts["text_encoder_2"] = (CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2",
                                                                                   dtype=f32)
                                       if text_encoders else None)
        else:
            parts["unet"] = UNet2DConditionModel.load_config(root, subfolder="unet")
            parts["vae"] = AutoencoderKL.load_config(vae_root, subfolder=vae_sub)
            parts["text_encoder"] = CLIPTextConfig.from_pretrained(root, subfolder="text_encoder").to_dict()
            parts["text_encoder_2"] = CLIPTextConfig.from_pretrained(root, subfolder="text_encoder_2").to_dict()
        # The stock SDXL VAE overflows in fp16 (black images); a separately given VAE is taken to be
        # an fp16-safe one (e.g. madebyollin/sdxl-vae-fp16-fix).
        b = cls(root, parts, sched_cfg, vae_encode_batch_size, vae_is_fp16_safe=vae_path is not None,
                use_fix_crop_and_size=use_fix_crop_and_size)
        if weights:
            b.freeze()
        return b

    @property
    def tokenizer_2(self):
        return self.parts["tokenizer_2"]

    @property
    def text_encoder_2(self):
        return self.parts["text_encoder_2"]

    def part_dtype(self, name, dtype):
        if name == "vae" and dtype == torch.float16 and not self.vae_is_fp16_safe:
            return torch.float32
        return dtype

    def load_text_encoders(self) -> None:
        from transformers import CLIPTextModelWithProjection

        super().load_text_encoders()
        te2 = CLIPTextModelWithProjection.from_pretrained(self.root, subfolder="text_encoder_2", dtype=torch.float32)
        self.parts["text_encoder_2"] = te2.requires_grad_(False).eval().to(self.device, self._text_dtype)

    def _size(self, size):
        if size is None:
            s = self.default_resolution
            return (s, s)
        return size

    def time_ids(self, n, size, original_size=None, crop_top_left=None) -> torch.Tensor:
        h, w = self._size(size)
        if original_size is None or self.use_fix_crop_and_size:
            original_size = torch.tensor([[h, w]] * n)
            crop_top_left = torch.zeros(n, 2, dtype=torch.long)
        target = torch.tensor([[h, w]] * n)
        return torch.cat([original_size, crop_top_left, target], dim=1).float().to(self.device)

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Cond:
        """Penultimate hidden states of both encoders, concatenated, and the pooled projection."""
        if self.text_encoder is None:
            return self._cached_text(prompts)
        hidden = []
        pooled = None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the projected pooled output of the second encoder
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def cond_from_text(self, text, size=None, original_size=None, crop_top_left=None) -> Cond:
        """Text outputs plus the micro-conditioning ``time_ids`` of each image."""
        n = text["encoder_hidden_states"].shape[0]
        return {**text, "time_ids": self.time_ids(n, size, original_size, crop_top_left)}

    def uncond(self, batch_size: int, size=None, like=None) -> Cond:
        """Zeros for both text inputs (SDXL's ``force_zeros_for_empty_prompt``) and the time ids of the
        conditional input ``like`` row by row: StableDiffusionXLPipeline passes the same
        ``add_time_ids`` to both halves of its CFG batch, and diffusers' LCD scripts copy the conditional
        ``time_ids`` (each image's original size and crop) into the unconditional pass. Without
        ``like``: the time ids of an uncropped image of ``size``."""
        if self._uncond is None or self._uncond["size"] != self._size(size):
            c = self.encode_text([""], size)
            self._uncond = {"size": self._size(size), "encoder_hidden_states": torch.zeros_like(c["encoder_hidden_states"]),
                            "text_embeds": torch.zeros_like(c["text_embeds"]), "time_ids": c["time_ids"]}
        out = {k: v.expand(batch_size, *v.shape[1:]) for k, v in self._uncond.items() if k != "size"}
        if like is not None:
            if like["time_ids"].shape[0] != batch_size:
                raise ValueError(f"uncond: {batch_size} rows asked, the conditional input has {like['time_ids'].shape[0]}")
            out["time_ids"] = like["time_ids"]
        return out

    def pipeline(self, denoiser, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                                         tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=denoiser,
                                         scheduler=scheduler)
