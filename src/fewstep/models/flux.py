"""The FLUX.1 family: FluxPipeline's rectified-flow MMDiT (FluxTransformer2DModel: double-stream blocks,
then single-stream blocks), a CLIP text encoder whose pooled output conditions the modulation, a T5
encoder whose sequence is the text stream, a 16-channel AutoencoderKL with shift and scale, and
FlowMatchEulerDiscreteScheduler with a resolution-dependent shift.

What the rest of fewstep sees is the same as for any flow teacher: (B, C, h, w) latents, timesteps
t = 1000σ of the flow table, conditions as dicts of tensors. Everything FLUX-specific happens here:

- **Packing.** FluxPipeline draws (B, C, h, w) noise and packs it into (B, h/2 · w/2, 4C) tokens (2×2
  patches), with ``img_ids`` (row, column of each patch) and all-zero ``txt_ids`` for rotary positions;
  :meth:`denoise` packs, builds the ids, runs the transformer at ``timestep = t / 1000`` (as the
  pipeline passes it) and unpacks. Methods keep working on (B, C, h, w). The Euler step is elementwise,
  so it commutes with packing; samplers that draw noise per step (FlowMatchLCMScheduler) draw it in the
  pipeline's packed layout (:meth:`pipeline_latents`), so `fewstep sample` equals the vanilla pipeline.
- **Shift.** ``mu`` is the pipeline's ``calculate_shift`` of the image sequence length (h/2 · w/2
  tokens), between ``base_shift`` at ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len``
  (FLUX.1-dev; schnell has a static shift of 1). The pipeline samples the sigmas
  ``linspace(1, 1/N, N)`` shifted by mu (:meth:`default_sigmas`), not its scheduler's own default grid.
- **Text.** The pipeline's own ``encode_prompt``: CLIP's pooled output (77 tokens) as
  ``pooled_projections``, T5's last hidden states (``max_sequence_length`` tokens, 512 by default, or
  what the folder recorded) as ``encoder_hidden_states``. CFG's unconditional input (schnell, or a
  teacher read with real CFG) is the empty prompt encoded the same way, which is what FluxPipeline's
  ``negative_prompt=""`` with ``true_cfg_scale`` gives.
- **Guidance.** FLUX.1-dev is guidance-distilled: its transformer takes the CFG scale itself as an input
  (``guidance_embeds``; the pipeline passes ``guidance_scale`` there and runs no unconditional batch), so
  this bundle's :attr:`guidance_embedding` is ``"native"`` and the ``w`` of :meth:`denoise` is that scale
  (:meth:`guidance_input`). FLUX.1-schnell has no guidance input (``None``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError
from .base import Cond, ModelBundle, Tap, check_teacher_path, checked_index, config_parts, net_config

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
# diffusers' FLUX DreamBooth-LoRA default: the attention projections of both streams and both feed-forwards
# ("attn.to_q/k/v" also match the single-stream blocks' attention, which has no output projection).
FLUX_LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"]

# kohya / ComfyUI (the original BFL checkpoint's module names) of the double-stream blocks: one name per
# diffusers module, or one fused layer for several (q, k, v in one ``qkv``).
_DOUBLE = [("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")), ("img_attn_proj", ("attn.to_out.0",)),
           ("img_mlp_0", ("ff.net.0.proj",)), ("img_mlp_2", ("ff.net.2",)), ("img_mod_lin", ("norm1.linear",)),
           ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
           ("txt_attn_proj", ("attn.to_add_out",)), ("txt_mlp_0", ("ff_context.net.0.proj",)),
           ("txt_mlp_2", ("ff_context.net.2",)), ("txt_mod_lin", ("norm1_context.linear",))]
# single-stream: linear1 = [q; k; v; mlp-in] fused, linear2 = proj_out, modulation.lin = norm.linear
_SINGLE = [("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), ("linear2", ("proj_out",)),
           ("modulation_lin", ("norm.linear",))]
_GLOBAL = [("img_in", "x_embedder"), ("txt_in", "context_embedder"),
           ("time_in_in_layer", "time_text_embed.timestep_embedder.linear_1"),
           ("time_in_out_layer", "time_text_embed.timestep_embedder.linear_2"),
           ("vector_in_in_layer", "time_text_embed.text_embedder.linear_1"),
           ("vector_in_out_layer", "time_text_embed.text_embedder.linear_2"),
           ("guidance_in_in_layer", "time_text_embed.guidance_embedder.linear_1"),
           ("guidance_in_out_layer", "time_text_embed.guidance_embedder.linear_2")]


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2 · w/2, 4C): 2×2 patches in raster order, channels-major within a patch,
    as FluxPipeline._pack_latents lays them out."""
    B, C, h, w = z.shape
    return z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for a latent grid of h × w."""
    B, _, C4 = tokens.shape
    return tokens.view(B, h // 2, w // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Rotary position ids (0, row, column) of the h/2 × w/2 patches (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBundle(ModelBundle):
    family = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_name = "transformer"
    text_parts = ("text_encoder", "text_encoder_2")
    lora_targets = FLUX_LORA_TARGETS
    guidance_embedding = None  # per folder: "native" where the transformer has guidance_embeds (FLUX.1-dev)
    step_generator = False  # FluxPipeline does not hand its generator to scheduler.step

    # The T5 sequence length of the prompt embedding: the pipeline's ``max_sequence_length`` (512 by
    # default; FLUX.1-schnell's card uses 256). A folder trained with another records it in
    # fewstep_sampling.json's ``pipeline_kwargs``, and every encoding here and in its cards uses it.
    max_sequence_length = 512

    def __init__(self, root, parts, scheduler_config, vae_encode_batch_size=32):
        super().__init__(root, parts, scheduler_config, vae_encode_batch_size)
        if self.part_config("transformer").get("guidance_embeds"):
            self.guidance_embedding = "native"
        hints = Path(root) / "fewstep_sampling.json"
        if hints.is_file():
            n = json.loads(hints.read_text()).get("pipeline_kwargs", {}).get("max_sequence_length")
            if n:
                self.max_sequence_length = int(n)

    @staticmethod
    def matches(index: dict) -> bool:
        return index.get("_class_name") == "FluxPipeline"

    def call_kwargs(self) -> dict:
        return {} if self.max_sequence_length == 512 else {"max_sequence_length": self.max_sequence_length}

    def guidance_call_kwargs(self, guidance_scale) -> dict:
        # Without a guidance input, FluxPipeline ignores guidance_scale: its real CFG is true_cfg_scale
        # with a negative prompt, which for "" is exactly the unconditional input fewstep uses.
        if self.guidance_embedding != "native" and guidance_scale is not None and guidance_scale > 1:
            return {"true_cfg_scale": guidance_scale, "negative_prompt": ""}
        return {}

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, revision: str | None = None, vae_path: str | None = None, weights: bool = True,
             vae_encode_batch_size: int = 32, text_encoders: bool = True, **family_options) -> FluxBundle:
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            FluxPipeline,
            FluxTransformer2DModel,
        )

        root = check_teacher_path(path, revision)
        checked_index(root, PARTS, "not a complete FluxPipeline")
        sched_cfg = FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler")
        if not weights:
            return cls(root, config_parts(root, vae_path, FluxTransformer2DModel, AutoencoderKL), sched_cfg, vae_encode_batch_size)
        kw = {}
        if vae_path:
            kw["vae"] = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32)
        if not text_encoders:  # training from a cache: the tokenizers stay, T5 and CLIP are never read
            kw.update(text_encoder=None, text_encoder_2=None)
        pipe = FluxPipeline.from_pretrained(root, torch_dtype=torch.float32, **kw)
        bundle = cls(root, dict(pipe.components), sched_cfg, vae_encode_batch_size)
        bundle.freeze()
        return bundle

    def load_text_encoders(self) -> None:
        from transformers import CLIPTextModel, T5EncoderModel

        for name, enc_cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel)):
            enc = enc_cls.from_pretrained(self.root, subfolder=name, dtype=torch.float32)
            self.parts[name] = enc.requires_grad_(False).eval().to(self.device, self._text_dtype)

    def _pipe(self):
        from diffusers import FluxPipeline

        return FluxPipeline(**{k: self.parts.get(k) for k in (
            "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})

    # ---- latents -------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.part_config(self.denoiser_name)["in_channels"] // 4  # a token is a 2×2 patch

    @property
    def default_resolution(self) -> int:
        # FluxTransformer2DModel has no sample size; the VAE's is the pipeline's default (1024 for FLUX.1).
        return self.part_config("vae")["sample_size"]

    @property
    def pixel_multiple(self) -> int:
        # The transformer's own patch_size is 1: its 2×2 patches are the packing above, so an image side is
        # whole packed tokens, 2 · vae_scale pixels (FluxPipeline would silently round other sizes down).
        return 2 * self.vae_scale

    def pipeline_latents(self, z: torch.Tensor) -> torch.Tensor:
        return pack(z)

    def model_latents(self, z: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack(z, height // self.vae_scale, width // self.vae_scale)

    # ---- conditioning ----------------------------------------------------------------------------
    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Cond:
        if self.parts.get("text_encoder") is None:
            return self._cached_text(prompts)
        embeds, pooled, _ = self._pipe().encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                       max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    # ---- schedule --------------------------------------------------------------------------------
    def shift_mu(self, height: int, width: int) -> float | None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler_config
        seq_len = (height // (2 * self.vae_scale)) * (width // (2 * self.vae_scale))  # packed image tokens
        return calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def default_sigmas(self, num_inference_steps: int, scheduler=None) -> list[float] | None:
        import numpy as np

        if scheduler is not None and getattr(scheduler.config, "use_flow_sigmas", False):
            return None  # FluxPipeline leaves such schedulers (DPM-Solver on flow sigmas) their own grid
        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()

    # ---- denoiser --------------------------------------------------------------------------------
    def guidance_input(self, scale):
        return scale  # the transformer's guidance embedding takes the CFG scale itself

    def embeds_guidance(self, net) -> bool:
        return bool(net_config(net).get("guidance_embeds"))

    def denoise(self, net, z, t, cond, w=None):
        """The velocity v̂ = ε̂ − x̂₀ at scheduler timestep t (= 1000·σ), (B, C, h, w) in and out; ``w``:
        the guidance scale for transformers with a guidance embedding (FLUX.1-dev)."""
        # (every transformer of a bundle has the teacher's architecture: the folder says which input it has)
        if (w is not None) != (self.guidance_embedding == "native"):
            raise ConfigError("FLUX.1-dev transformers take the guidance scale as an input and schnell ones take "
                              f"none; this one ({self.root}) was given {'one' if w is not None else 'none'}")
        dtype = self._cast_dtype(net, z)
        B, _, h, wd = z.shape
        t = torch.as_tensor(t, device=z.device)
        t = t.expand(B) if t.ndim == 0 else t
        txt = cond["encoder_hidden_states"]
        g = None if w is None else torch.as_tensor(w, device=z.device, dtype=torch.float32).expand(B)
        out = net(hidden_states=pack(z.to(dtype)), timestep=t.to(dtype) / 1000, guidance=g,
                  pooled_projections=cond["pooled_projections"].to(dtype), encoder_hidden_states=txt.to(dtype),
                  txt_ids=torch.zeros(txt.shape[1], 3, device=z.device, dtype=dtype),
                  img_ids=image_ids(h, wd, z.device, dtype), return_dict=False)[0]
        # (a discriminator head reading this forward's features returns its logits in the output's place)
        return self._output(unpack(out, h, wd) if out.ndim == 3 else out)

    def new_denoiser(self, guidance_dim: int | None = None):
        from diffusers import FluxTransformer2DModel

        if guidance_dim is not None:
            raise ConfigError("FLUX transformers get no new guidance embedding: FLUX.1-dev has its own "
                              "(guidance_embeds), schnell none")
        cfg = {k: v for k, v in self.denoiser.config.items() if not k.startswith("_")}
        student = FluxTransformer2DModel.from_config(cfg)
        student.load_state_dict(self.denoiser.state_dict(), strict=True)
        return student.float().train()

    def feature_tap(self, net) -> Tap:
        """The image tokens after the middle block of the whole stack (double-stream blocks, then
        single-stream ones: FLUX.1's 19 + 38 give single block 9), folded back to the patch grid:
        (B, inner_dim, h/2, w/2)."""
        double, single = net.transformer_blocks, net.single_transformer_blocks
        m = (len(double) + len(single) - 1) // 2
        mid = double[m] if m < len(double) else single[m - len(double)]
        grid = {}

        def attach(callback):
            def grab_size(module, args, kwargs):
                ids = kwargs["img_ids"]  # the last patch sits at (row h/2 − 1, column w/2 − 1)
                grid["hw"] = (int(ids[-1, 1]) + 1, int(ids[-1, 2]) + 1)

            def fold(module, args, output):
                tokens = output[1]  # (encoder_hidden_states, hidden_states)
                h, w = grid["hw"]
                callback(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w))

            return [net.register_forward_pre_hook(grab_size, with_kwargs=True), mid.register_forward_hook(fold)]

        return Tap(net.config.num_attention_heads * net.config.attention_head_dim, attach,
                   lambda h, w: (h // 2, w // 2))  # tokens of 2×2 latent patches

    # ---- LoRA ------------------------------------------------------------------------------------
    def kohya_lora(self, peft_state_dict: dict[str, torch.Tensor], alpha: float) -> dict:
        """The LoRA in the kohya / ComfyUI layout of the original FLUX.1 checkpoint: ``lora_unet_
        double_blocks_{i}_{img,txt}_{attn_qkv,attn_proj,mlp_0,mlp_2,mod_lin}``, ``lora_unet_single_blocks_
        {i}_{linear1,linear2,modulation_lin}``, ``lora_unet_{img_in,txt_in,time_in_*,vector_in_*,
        guidance_in_*,final_layer_*}``, each with ``lora_down`` / ``lora_up`` / ``alpha``.

        Fused layers (q, k, v in one ``qkv``; linear1 = q, k, v and the MLP input) get the separate
        adapters side by side: lora_down stacks the n downs (n·r rows), lora_up is block-diagonal, alpha is
        n·α so that the scale α/r is unchanged; a part without an adapter is a zero block. This is the
        "sparse" layout diffusers' kohya-FLUX converter splits back into the exact separate adapters.
        The final layer's alpha is folded into lora_down (and written as the rank), since that converter
        ignores it there; its modulation rows are swapped to the original (shift, scale) order."""
        r = next(v.shape[0] for k, v in peft_state_dict.items() if k.endswith("lora_A.weight"))
        cfg = self.part_config(self.denoiser_name)
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        sizes = {"proj_mlp": 4 * inner}  # FluxSingleTransformerBlock's mlp_ratio 4
        out: dict[str, torch.Tensor] = {}

        def lora(prefix):
            a, b = peft_state_dict.get(f"{prefix}.lora_A.weight"), peft_state_dict.get(f"{prefix}.lora_B.weight")
            return (a, b) if a is not None else None

        def put(name, down, up, a):
            out[f"lora_unet_{name}.lora_down.weight"] = down.contiguous()
            out[f"lora_unet_{name}.lora_up.weight"] = up.contiguous()
            out[f"lora_unet_{name}.alpha"] = torch.tensor(float(a))

        def fused(name, block, parts):
            found = {p: lora(f"{block}.{p}") for p in parts}
            if not any(found.values()):
                return
            fan_in = next(ab[0].shape[1] for ab in found.values() if ab)
            downs, ups = [], []
            for p, ab in found.items():
                if ab is None:  # not adapted: a zero block (no change to that part of the fused layer)
                    rows = sizes.get(p, inner)
                    ab = (torch.zeros(r, fan_in), torch.zeros(rows, r))
                downs.append(ab[0])
                ups.append(ab[1])
            put(name, torch.cat(downs), torch.block_diag(*ups), len(parts) * alpha)

        for i in range(cfg["num_layers"]):
            for name, parts in _DOUBLE:
                fused(f"double_blocks_{i}_{name}", f"transformer_blocks.{i}", parts)
        for i in range(cfg["num_single_layers"]):
            for name, parts in _SINGLE:
                fused(f"single_blocks_{i}_{name}", f"single_transformer_blocks.{i}", parts)
        for name, module in _GLOBAL:
            ab = lora(module)
            if ab:
                put(name, ab[0], ab[1], alpha)
        for name, module, swap in (("final_layer_linear", "proj_out", False),
                                   ("final_layer_adaLN_modulation_1", "norm_out.linear", True)):
            ab = lora(module)
            if ab:
                up = torch.cat(ab[1].chunk(2)[::-1]) if swap else ab[1]  # diffusers (scale, shift) → (shift, scale)
                put(name, ab[0] * (alpha / r), up, r)
        used = {k.rsplit(".lora_", 1)[0] for k in peft_state_dict}
        known = {f"{blk}.{i}.{p}" for blk, n, spec in (("transformer_blocks", cfg["num_layers"], _DOUBLE),
                                                       ("single_transformer_blocks", cfg["num_single_layers"], _SINGLE))
                 for i in range(n) for _, ps in spec for p in ps}
        known |= {m for _, m in _GLOBAL} | {"proj_out", "norm_out.linear"}
        if used - known:  # (every Linear of FluxTransformer2DModel has a name; an added module may not)
            import logging

            logging.getLogger("fewstep").warning(
                "the kohya/ComfyUI LoRA file lacks %s (no name in the original FLUX checkpoint); "
                "pytorch_lora_weights.safetensors has them", sorted(used - known))
        return out
