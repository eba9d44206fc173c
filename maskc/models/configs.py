"""Backbone configurations the project uses (no weights: hubs are unreachable here)."""
from __future__ import annotations

# google/ddpm-cifar10-32, the UNet2DModel of DDPM on CIFAR-10 (35.7M parameters).
DDPM_CIFAR10: dict = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
}


def ddpm_cifar10(width: int = 128, in_channels: int = 3, **overrides) -> dict:
    """The DDPM-CIFAR10 topology at another base width (``width=128`` is the original)."""
    cfg = dict(DDPM_CIFAR10)
    cfg["block_out_channels"] = (width, 2 * width, 2 * width, 2 * width)
    cfg["norm_num_groups"] = min(32, width // 4)
    cfg["in_channels"] = cfg["out_channels"] = in_channels
    cfg.update(overrides)
    return cfg


# The class-conditional DiT trained on Fashion-MNIST (examples/train_fmnist.py --arch dit):
# DiT's topology (adaLN-Zero, learned label embedding with a null class for
# classifier-free guidance) at 6 layers x 128 wide, patch 4 on 32x32 (64 tokens).
FMNIST_DIT: dict = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": 32,
    "patch_size": 4,
    "num_embeds_ada_norm": 10,  # classes; label 10 is the null (unconditional) label
}


# The text-conditioned, Stable-Diffusion-like U-Net trained on Fashion-MNIST
# (examples/train_fmnist.py --arch sd): diffusers' UNet2DConditionModel (SD's
# topology: ResNet blocks + transformer blocks with self- and cross-attention) at
# 32/64/64 channels. It reads ``encoder_hidden_states`` [N, L, 64] from a fixed caption
# table (``captions.safetensors`` beside the weights, FMNIST_SD_CAPTIONS below), the
# stand-in for a frozen text encoder. ``attention_head_dim`` is diffusers' legacy name
# for the number of heads here (4 heads of 16).
FMNIST_SD: dict = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
}

# The caption table: row c < 10 is the caption of class c, row 10 the null (empty)
# caption for classifier-free guidance; ``tokens`` x ``cross_attention_dim`` per row,
# standard normal from torch.Generator().manual_seed(seed).
FMNIST_SD_CAPTIONS: dict = {"rows": 11, "tokens": 4, "dim": 64, "null": 10, "seed": 1234}
