"""`vit-tiny`: ViT-Ti/16 (DeiT-Tiny shape) in plain PyTorch, with timm's module names.

What it is for: the vision transformer case: a patch-embedding convolution, a fused qkv Linear,
pre-LayerNorm blocks with GELU MLPs and a class token, so the sparse-Linear rewrites meet a
197-token sequence whose length comes from the image, not from the input. ViT-Ti/16 (hidden 192,
12 layers, 3 heads, MLP 768, 224x224 images) is the smallest standard ViT, 5.7M parameters.

Names follow timm's `VisionTransformer`: `patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.{i}.norm1`, `blocks.{i}.attn.qkv`, `blocks.{i}.attn.proj`, `blocks.{i}.norm2`,
`blocks.{i}.mlp.fc1`, `blocks.{i}.mlp.fc2`, `norm`, `head`. Forward takes images
[batch, 3, image, image] and returns class logits [batch, classes] from the class token.
Only the batch dimension can be dynamic: the position table fixes the image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._spec import Spec, check_heads, init_weights_, token_spec_fns

__all__ = ["VisionTransformer", "ZOO"]


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(3, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [b, hidden, gh, gw] -> [b, tokens, hidden]


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(ctx.transpose(1, 2).reshape(b, n, h))


class Mlp(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg["hidden"], eps=1e-6)
        self.attn = Attention(cfg["hidden"], cfg["heads"])
        self.norm2 = nn.LayerNorm(cfg["hidden"], eps=1e-6)
        self.mlp = Mlp(cfg["hidden"], cfg["ffn"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier; `forward(images)` returns logits [batch, classes]."""

    def __init__(self, cfg: dict):
        super().__init__()
        tokens = (cfg["image"] // cfg["patch"]) ** 2
        self.patch_embed = PatchEmbed(cfg["patch"], cfg["hidden"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg["hidden"]))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, cfg["hidden"]))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["layers"]))
        self.norm = nn.LayerNorm(cfg["hidden"], eps=1e-6)
        self.head = nn.Linear(cfg["hidden"], cfg["classes"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def _build(cfg: dict) -> VisionTransformer:
    model = init_weights_(VisionTransformer(cfg))
    # timm draws these N(0, 0.02) as well (truncated; the truncation hardly matters at 0.02).
    nn.init.normal_(model.cls_token, 0.0, 0.02)
    nn.init.normal_(model.pos_embed, 0.0, 0.02)
    return model


def _batch(cfg: dict, gen: torch.Generator) -> tuple:
    return (torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], generator=gen, dtype=torch.float32),)


def _validate(cfg: dict) -> None:
    check_heads(cfg)
    if cfg["image"] % cfg["patch"]:
        raise ValueError(f"image ({cfg['image']}) must be a multiple of patch ({cfg['patch']})")


_example, _calibration = token_spec_fns(_batch)

ZOO = {
    "vit-tiny": Spec(
        description="ViT-Ti/16 classifier (224x224, hidden 192, 12 layers, 3 heads), random init",
        defaults={
            "image": 224, "patch": 16, "hidden": 192, "layers": 12, "heads": 3, "ffn": 768,
            "classes": 1000, "batch": 1,
        },
        build=_build, example=_example, calibration=_calibration,
        inputs="(images [batch, 3, image, image] float32,) positional",
        validate=_validate,
    ),
}
