"""Write a diffusers Stable Diffusion 1.x/2.x pipeline as an original (LDM / CompVis) single-file checkpoint.

Key names follow the original repository's modules: the UNet's input/middle/output blocks, the VAE's
encoder.down / decoder.up (in reverse order), and the text encoder's Hugging Face CLIP keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder under their LDM key names."""
    state: dict[str, torch.Tensor] = {}
    parts = [
        (UNET, pipe.unet.state_dict(), unet_modules(pipe.unet.config)),
        (VAE, pipe.vae.state_dict(), vae_modules(pipe.vae.config)),
    ]
    for prefix, weights, modules in parts:
        for key, tensor in weights.items():
            state[prefix + rename(key, modules)] = tensor
    for key, tensor in pipe.text_encoder.state_dict().items():
        state[TEXT + key.removeprefix("text_model.")] = tensor
    return {key: conv_1x1(key, tensor).contiguous() for key, tensor in state.items()}


def save_checkpoint(pipe: Any, path: Path) -> Path:
    """`.safetensors` as a flat state dict; `.ckpt` as torch.save({"state_dict": ...}), as the original repo did."""
    state = ldm_state_dict(pipe)
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)
    return path


def rename(key: str, modules: dict[str, str]) -> str:
    """Replace the longest module path of `key` that `modules` knows; an unknown key is an error."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:end])
        if module in modules:
            return ".".join([modules[module], *parts[end:]])
    raise KeyError(f"no LDM name for {key!r}")


def conv_1x1(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The VAE's mid-block attention is linear in diffusers and 1x1 convolutions in LDM."""
    if key.startswith(VAE) and ".mid.attn_1." in key and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


def unet_modules(config: Any) -> dict[str, str]:
    per_block = config["layers_per_block"]
    modules = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    modules |= renamed("mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    modules |= renamed("mid_block.resnets.1", "middle_block.2", UNET_RESNET)
    modules["mid_block.attentions.0"] = "middle_block.1"
    layer = 1
    for block in range(len(config["down_block_types"])):
        for i in range(per_block):
            modules |= renamed(f"down_blocks.{block}.resnets.{i}", f"input_blocks.{layer}.0", UNET_RESNET)
            modules[f"down_blocks.{block}.attentions.{i}"] = f"input_blocks.{layer}.1"
            layer += 1
        modules[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{layer}.0.op"
        layer += 1
    layer = 0
    for block, block_type in enumerate(config["up_block_types"]):
        for i in range(per_block + 1):
            modules |= renamed(f"up_blocks.{block}.resnets.{i}", f"output_blocks.{layer}.0", UNET_RESNET)
            modules[f"up_blocks.{block}.attentions.{i}"] = f"output_blocks.{layer}.1"
            layer += 1
        upsampler = 2 if block_type.startswith("CrossAttn") else 1  # after the attention, if there is one
        modules[f"up_blocks.{block}.upsamplers.0.conv"] = f"output_blocks.{layer - 1}.{upsampler}.conv"
    return modules


def vae_modules(config: Any) -> dict[str, str]:
    count, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    modules = {name: name for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        modules |= {f"{part}.{name}": f"{part}.{name}" for name in ("conv_in", "conv_out")}
        modules[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        modules |= renamed(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET)
        modules |= renamed(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET)
        modules |= renamed(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)
    for block in range(count):
        # LDM numbers the decoder's blocks like the encoder's (highest resolution first), diffusers in running order
        down, up = f"encoder.down.{block}", f"decoder.up.{count - 1 - block}"
        for i in range(per_block):
            modules |= renamed(f"encoder.down_blocks.{block}.resnets.{i}", f"{down}.block.{i}", VAE_RESNET)
        for i in range(per_block + 1):
            modules |= renamed(f"decoder.up_blocks.{block}.resnets.{i}", f"{up}.block.{i}", VAE_RESNET)
        modules[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = f"{down}.downsample.conv"
        modules[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = f"{up}.upsample.conv"
    return modules


def renamed(diffusers: str, ldm: str, children: dict[str, str]) -> dict[str, str]:
    return {diffusers: ldm} | {f"{diffusers}.{a}": f"{ldm}.{b}" for a, b in children.items()}
