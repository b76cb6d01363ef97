"""Builders of teachers with random weights, from configs: tiny ones for tests, full-size SD1.5
architectures for benchmarks, plus CLIP tokenizers written offline and toy caption folders.

Nothing here downloads anything: tokenizer vocabularies are generated (a byte-level alphabet plus
merges for chosen words) or rebuilt from the CLIP BPE merges file when the caller has it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEFAULT_WORDS = ["a", "handwritten", "digit", "photo", "of", "cat", "dog", *DIGIT_WORDS]


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte → printable-character map of byte-level BPE (GPT-2 / CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def write_clip_tokenizer(out_dir: str | Path, words: list[str] | None = None, model_max_length: int = 16) -> Path:
    """A real ``CLIPTokenizer`` with a small vocabulary: every byte, plus whole-word tokens for ``words``
    (built by left-to-right merges, so the BPE is valid). Other text falls back to single bytes."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    seen = set(vocab)
    for word in words or DEFAULT_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            m = f"{pieces[0]} {pieces[1]}"
            if m not in merges:
                merges.append(m)
            if merged not in seen:
                vocab.append(merged)
                seen.add(merged)
            pieces = [merged] + pieces[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return _save_tokenizer(out, vocab, merges, model_max_length, CLIPTokenizer)


def write_clip_tokenizer_from_bpe(out_dir: str | Path, bpe_gz: str | Path, model_max_length: int = 77) -> Path:
    """The real 49,408-token CLIP vocabulary, rebuilt from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``."""
    from transformers import CLIPTokenizer

    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1: 49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return _save_tokenizer(Path(out_dir), vocab, merges, model_max_length, CLIPTokenizer)


def _save_tokenizer(out: Path, vocab, merges, model_max_length, cls) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = cls.from_pretrained(str(out), model_max_length=model_max_length)
    tok.save_pretrained(str(out))
    return out


def tiny_sd_components(prediction_type: str = "epsilon", image_size: int = 32, text_dim: int = 32,
                       words: list[str] | None = None, model_max_length: int = 16, tokenizer_dir=None,
                       block_out_channels=(32, 64), seed: int = 0):
    """Tokenizer, CLIP text encoder, VAE (÷4), UNet and DDPM scheduler with random weights."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if tokenizer_dir:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="fewstep-tok-") as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp, words, model_max_length)))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=model_max_length, projection_dim=text_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 32, 64],
                        latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=image_size)
    unet = UNet2DConditionModel(
        sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(block_out_channels), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_dim,
        attention_head_dim=8, norm_num_groups=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=prediction_type,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler)


def save_sd_pipeline(out_dir: str | Path, parts: dict) -> Path:
    """Write the parts as a StableDiffusionPipeline folder (model_index.json, one folder per part)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_sd(out_dir: str | Path, prediction_type: str = "epsilon", **kw) -> Path:
    """A tiny SD-like teacher (32 px images, 8×8 latents) as a diffusers folder."""
    return save_sd_pipeline(out_dir, tiny_sd_components(prediction_type, **kw))


def write_caption_folder(out_dir: str | Path, n: int = 8, size: int = 40, seed: int = 0,
                         captions: list[str] | None = None) -> Path:
    """A folder of random-blob PNG images with .txt caption sidecars."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    caps = captions or [f"a handwritten digit {DIGIT_WORDS[i % 10]}" for i in range(n)]
    for i in range(n):
        base = rng.integers(0, 255, size=(1, 1, 3))
        img = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(caps[i % len(caps)])
    return out


def tiny_sdxl_components(prediction_type: str = "epsilon", image_size: int = 32, seed: int = 0,
                         model_max_length: int = 16):
    """An SDXL-shaped teacher: two text encoders (the second with projection), pooled text embeddings
    and micro-conditioning time ids, with random weights."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="fewstep-tok-") as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp, None, model_max_length)))
    torch.manual_seed(seed)

    def text_cfg(dim):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=model_max_length,
                              projection_dim=dim, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    text_encoder = CLIPTextModel(text_cfg(32))
    text_encoder_2 = CLIPTextModelWithProjection(text_cfg(32))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 32, 64],
                        latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=image_size)
    unet = UNet2DConditionModel(
        sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=16)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type=prediction_type,
                                       timestep_spacing="leading", steps_offset=1)
    return dict(tokenizer=tokenizer, tokenizer_2=tokenizer, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                vae=vae, unet=unet, scheduler=scheduler)


def build_tiny_sdxl(out_dir: str | Path, prediction_type: str = "epsilon", **kw) -> Path:
    """A tiny SDXL-like teacher as a StableDiffusionXLPipeline folder."""
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**tiny_sdxl_components(prediction_type, **kw)).save_pretrained(str(out_dir))
    return Path(out_dir)


def sd15_components(tokenizer_dir: str | Path | None = None, bpe_gz: str | Path | None = None, device="cpu"):
    """The Stable Diffusion 1.5 architecture with random weights (UNet 859.5 M, VAE 83.7 M, CLIP text
    123.1 M parameters), for benchmarks. The tokenizer is the real CLIP vocabulary when ``bpe_gz`` (the
    CLIP merges file) is given, else the small offline one (same model shapes)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="fewstep-tok-") as tmp:
        tdir = tokenizer_dir or (write_clip_tokenizer_from_bpe(tmp, bpe_gz) if bpe_gz else
                                 write_clip_tokenizer(tmp, None, 77))
        tokenizer = CLIPTokenizer.from_pretrained(str(tdir))
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                    num_hidden_layers=12, num_attention_heads=12,
                                                    max_position_embeddings=77, hidden_act="quick_gelu",
                                                    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
        vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                            sample_size=512)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler)


def tiny_sd3_components(image_size: int = 32, seed: int = 0, model_max_length: int = 16, variant: str = "3"):
    """A StableDiffusion3Pipeline-shaped teacher with random weights: a 2-layer SD3Transformer2DModel
    (patch 2), two CLIP text encoders with projection (their 32-d states side by side fill the 64-d
    joint width), no T5 (the pipeline then uses zeros for its tokens), a VAE (÷4) with SD3's shift
    and scale, and FlowMatchEulerDiscreteScheduler with SD3's shift 3. ``variant="3.5"``: SD3.5's
    transformer config (RMS QK-norm; SD3.5-medium's MMDiT-X dual attention in the first layer)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="fewstep-tok-") as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp, None, model_max_length)))
    torch.manual_seed(seed)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=model_max_length, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    text_encoder, text_encoder_2 = clip(), clip()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 32, 64],
                        latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=image_size,
                        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if variant == "3.5" else {}
    transformer = SD3Transformer2DModel(sample_size=image_size // 4, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=image_size // 4, **extra)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return dict(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def build_tiny_sd3(out_dir: str | Path, **kw) -> Path:
    """A tiny SD3-like flow-matching teacher as a StableDiffusion3Pipeline folder."""
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline(**tiny_sd3_components(**kw)).save_pretrained(str(out_dir))
    return Path(out_dir)


def sdxl_components(tokenizer_dir: str | Path | None = None, bpe_gz: str | Path | None = None, device="cpu"):
    """The Stable Diffusion XL base architecture with random weights (UNet 2567.5 M, VAE 83.7 M, CLIP
    ViT-L text 123.1 M, OpenCLIP bigG text with projection 694.7 M parameters), for benchmarks. The
    configs are SDXL 1.0's, written out here so nothing is downloaded. Tokenizers as in
    :func:`sd15_components`; the second one pads with "!" (token 0), as SDXL's ``tokenizer_2`` does.
    ``device="meta"`` builds shapes only (no memory, no initialisation), for FLOP and parameter counts."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="fewstep-tok-") as tmp:
        tdir = tokenizer_dir or (write_clip_tokenizer_from_bpe(tmp, bpe_gz) if bpe_gz else
                                 write_clip_tokenizer(tmp, None, 77))
        tokenizer = CLIPTokenizer.from_pretrained(str(tdir))
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(tdir), pad_token="!")

    def clip_cfg(hidden, layers, heads, act):
        return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                              hidden_act=act, projection_dim=hidden, bos_token_id=49406, eos_token_id=49407,
                              pad_token_id=1 if hidden == 768 else 0)

    with torch.device(device):
        text_encoder = CLIPTextModel(clip_cfg(768, 12, 12, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(clip_cfg(1280, 32, 20, "gelu"))
        vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                            sample_size=1024, scaling_factor=0.13025, force_upcast=True)
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    return dict(tokenizer=tokenizer, tokenizer_2=tokenizer_2, text_encoder=text_encoder,
                text_encoder_2=text_encoder_2, vae=vae, unet=unet, scheduler=scheduler)


# ---- Qwen-Image -------------------------------------------------------------------------------
# The chat and vision special tokens of the Qwen2.5-VL tokenizer (its added tokens, ids 151643 … in the
# real vocabulary), and the text QwenImagePipeline wraps every prompt in (its prompt_template_encode).
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                 "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                 "<|im_end|>\n<|im_start|>assistant\n")
# Qwen-Image's scheduler_config.json: resolution-dependent shift between 256 and 8192 packed tokens,
# stretched so the last sampling σ is 0.02.
QWEN_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                            max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                            time_shift_type="exponential")


def write_qwen2_tokenizer(out_dir: str | Path, words: list[str] | None = None) -> Path:
    """A real ``Qwen2Tokenizer`` (tokenizer.json + tokenizer_config.json) with a small vocabulary, made offline:
    byte-level BPE trained with the ``tokenizers`` library, under Qwen2's own pre-tokenizer, on the
    pipeline's prompt template and ``words`` until every word is one token. Every byte is in the vocabulary,
    so any text encodes; the template's system prefix is 34 tokens, as with the real vocabulary (the number
    of tokens QwenImagePipeline drops). The special tokens follow the learned ones."""
    import tempfile

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    words = words or DEFAULT_WORDS
    template = QWEN_TEMPLATE
    for s in QWEN_SPECIAL_TOKENS:
        template = template.replace(s, "")
    # each word alone and after a space (the pre-tokenizer keeps a word's leading space: "Ġcat")
    corpus = [template.format(" ".join(words)), " " + " ".join(words), "\n".join(words)]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=4096, min_frequency=1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fewstep-qwen-tok-") as tmp:
        bpe.model.save(tmp)
        vocab = json.loads((Path(tmp) / "vocab.json").read_text(encoding="utf-8"))
        for s in QWEN_SPECIAL_TOKENS:
            vocab[s] = len(vocab)
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        tok = Qwen2Tokenizer.from_pretrained(tmp, extra_special_tokens=QWEN_SPECIAL_TOKENS[1:],
                                             model_max_length=32768)
        tok.save_pretrained(str(out))
    return out


def tiny_qwenimage_components(image_size: int = 32, seed: int = 0):
    """A QwenImagePipeline-shaped teacher with random weights: a 2-layer QwenImageTransformer2DModel
    (32-d, 2 heads of 16 with 3-D RoPE axes 4/6/6, 2×2 patches of 4 latent channels), a Qwen2.5-VL text
    encoder (2 text layers of width 32 with M-RoPE, a 1-block vision tower of width 16 the text path
    never runs), a causal 3-D VAE (÷4, 4 channels with per-channel mean and std) and Qwen-Image's
    scheduler config; the tokenizer of :func:`write_qwen2_tokenizer`."""
    import tempfile

    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    with tempfile.TemporaryDirectory(prefix="fewstep-tok-") as tmp:
        tokenizer = Qwen2Tokenizer.from_pretrained(str(write_qwen2_tokenizer(tmp)))
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)))
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1e6,
                         rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])).eval()
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.12, -0.21, 0.33, -0.05],
                                 latents_std=[1.6, 0.8, 1.25, 2.1])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    return dict(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def build_tiny_qwenimage(out_dir: str | Path, **kw) -> Path:
    """A tiny Qwen-Image-like teacher as a QwenImagePipeline folder."""
    from diffusers import QwenImagePipeline

    QwenImagePipeline(**tiny_qwenimage_components(**kw)).save_pretrained(str(out_dir))
    return Path(out_dir)


def qwenimage_components(device="meta", num_layers: int = 60, text_layers: int = 28):
    """The Qwen-Image architecture (diffusers' QwenImageTransformer2DModel defaults: 60 dual-stream blocks
    of width 3072, text width 3584; AutoencoderKLQwenImage defaults; the Qwen2.5-VL-7B-Instruct text
    encoder with its vision tower) with random weights, for parameter counts (``device="meta"``: shapes
    only) and benchmarks; ``num_layers`` / ``text_layers`` shrink the transformer / the language model
    (same widths) to fit a machine. The configs are written out here, nothing is downloaded."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text_cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=text_layers,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1e6,
                         rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    with torch.device(device):
        transformer = QwenImageTransformer2DModel(num_layers=num_layers)
        vae = AutoencoderKLQwenImage()
        text_encoder = Qwen2_5_VLForConditionalGeneration(text_cfg)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder,
                scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER))


# ---- FLUX.1 ------------------------------------------------------------------------------------
def write_t5_tokenizer(out_dir: str | Path, words: list[str] | None = None, model_max_length: int = 512) -> Path:
    """A real ``T5TokenizerFast`` (a SentencePiece-style Unigram model, written as ``tokenizer.json``) with a
    small vocabulary made offline: T5's special tokens at T5's ids (<pad> 0, </s> 1, <unk> 2), the
    word-boundary piece "▁", whole words "▁word" for ``words``, and every lowercase letter, digit and
    common punctuation mark with and without "▁", so any such text tokenises. Whole words score higher
    than their spellings, so the Unigram model keeps them whole."""
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for word in words or DEFAULT_WORDS:
        if "▁" + word not in seen:
            pieces.append(("▁" + word, -3.0))
            seen.add("▁" + word)
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        for piece, score in ((c, -8.0), ("▁" + c, -8.5)):
            if piece not in seen:
                pieces.append((piece, score))
                seen.add(piece)
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    out = Path(out_dir)
    tok.save_pretrained(str(out))
    return out


def tiny_flux_components(variant: str = "dev", image_size: int = 32, seed: int = 0):
    """A FluxPipeline-shaped teacher with random weights: a FluxTransformer2DModel with one double-stream
    and two single-stream blocks (inner width 32, rotary axes 4 + 6 + 6 = the head width 16), with
    FLUX.1-dev's guidance embedding (``variant="dev"``) or without it (``"schnell"``); a CLIP text encoder
    (pooled 32-d) and a T5 v1.1-style encoder (gated GELU, 32-d states); a 16-channel VAE (÷4) with
    FLUX's shift and scale; and the variant's FlowMatchEulerDiscreteScheduler (dev: resolution-dependent
    shift; schnell: shift 1)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    if variant not in ("dev", "schnell"):
        raise ValueError(f"variant must be dev or schnell, got {variant!r}")
    with tempfile.TemporaryDirectory(prefix="fewstep-tok-") as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tmp) / "clip", None, 77)))
        tokenizer_2 = T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(Path(tmp) / "t5")))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 32, 64],
                        latent_channels=16, layers_per_block=1, norm_num_groups=16, sample_size=image_size,
                        shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=variant == "dev",
                                         axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[variant])
    return dict(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


# The scheduler configs of the FLUX.1-dev and FLUX.1-schnell repositories.
FLUX_SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
}


def build_tiny_flux(out_dir: str | Path, **kw) -> Path:
    """A tiny FLUX.1-like flow-matching teacher as a FluxPipeline folder (``variant="dev"`` or ``"schnell"``)."""
    from diffusers import FluxPipeline

    FluxPipeline(**tiny_flux_components(**kw)).save_pretrained(str(out_dir))
    return Path(out_dir)


def flux_components(variant: str = "dev", device="meta", num_layers: int = 19, num_single_layers: int = 38):
    """The FLUX.1 architecture with random weights (transformer, CLIP ViT-L/14 text, T5 v1.1 XXL encoder,
    16-channel VAE), written out from the published configs so nothing is downloaded; ``device="meta"``
    builds shapes only (parameter counts, memory estimates). ``num_layers`` / ``num_single_layers``
    shrink the transformer's depth (benchmarks on a small machine); the widths stay FLUX.1's. No
    tokenizers: the benchmarks feed token ids."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
            pad_token_id=1))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
            is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                            layers_per_block=2, latent_channels=16, sample_size=1024, scaling_factor=0.3611,
                            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
        transformer = FluxTransformer2DModel(guidance_embeds=variant == "dev", num_layers=num_layers,
                                             num_single_layers=num_single_layers)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[variant])
    return dict(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                text_encoder_2=text_encoder_2)
