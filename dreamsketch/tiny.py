"""`builtin:tiny`: a Stable Diffusion pipeline with fixed-seed random weights, built locally in under a second.

Its pictures are noise. It exists so the app, its tests and CI run with no network and no GPU.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

START, END = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77


def byte_characters() -> list[str]:
    """The 256 printable characters that CLIP's byte-level BPE uses for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> dict[str, int]:
    """A character-level CLIP vocabulary: every byte, alone and word-final, and the two special tokens."""
    tokens = byte_characters() + [c + "</w>" for c in byte_characters()] + [START, END]
    return {token: i for i, token in enumerate(tokens)}


def tiny_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=tiny_vocab(), merges=[], model_max_length=MAX_TOKENS)


def build_tiny_pipeline(tokenizer: CLIPTokenizer | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """The tiny-demo pipeline (fp32, CPU). The same seed always gives the same weights."""
    tokenizer = tokenizer or tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer, hidden=32))
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL-shaped tiny pipeline (two text encoders, text-time conditioning, force_upcast VAE), for tests."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,  # the two encoders' hidden states side by side
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the pooled 32
            norm_num_groups=8,
        )
        vae = tiny_vae()
        vae.register_to_config(force_upcast=True)
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer, hidden=32))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer, hidden=32))
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=unet.eval(),
        scheduler=tiny_scheduler(),
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
    )


def tiny_text_config(tokenizer: CLIPTokenizer, hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_scheduler() -> EulerAncestralDiscreteScheduler:
    return EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
