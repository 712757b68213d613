"""`llama-tiny`: a small Llama decoder (SwiGLU MLP, RMSNorm, rotary embeddings), HF names.

What it is for: modern decoders use gated SiLU MLPs, whose activations are *not* exactly sparse
(SiLU is rarely 0); sparsity there must be imposed (thresholding as in TEAL/CATS, or weight
sparsity as in SparseGPT/Wanda), and the down-projection input is a product of two branches.
This model makes those graph patterns (gate * up, RMSNorm, rotary) part of every test. The shape
(hidden 256, 4 layers, 4 heads of 64, FFN 688 ~ 8/3 * 256 rounded to 16, vocab 32000 as
Llama-2's tokenizer) is small enough for tests while keeping Llama's head size and ratios.

Structure and names as HF `LlamaModel` (no bias anywhere, one KV head per query head):
`embed_tokens`, `layers.{i}.input_layernorm`, `layers.{i}.self_attn.{q,k,v,o}_proj`,
`layers.{i}.post_attention_layernorm`, `layers.{i}.mlp.{gate,up,down}_proj`, `norm`. Rotary
embeddings use HF's "rotate half" layout (not interleaved), so HF Llama weights load unchanged.
Forward takes `input_ids` [batch, seq] and returns the final normed hidden states
[batch, seq, hidden], no LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._spec import Spec, check_heads, init_weights_, random_ids, token_spec_fns

__all__ = ["LlamaModel", "LlamaRMSNorm", "ZOO"]


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        # Not persistent: derived from the config, so it is not part of the state dict (as in HF).
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq, device=device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [seq, head_dim]
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(ctx.transpose(1, 2).reshape(b, s, h))


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self_attn = LlamaAttention(cfg["hidden"], cfg["heads"])
        self.mlp = LlamaMLP(cfg["hidden"], cfg["ffn"])
        self.input_layernorm = LlamaRMSNorm(cfg["hidden"], cfg["eps"])
        self.post_attention_layernorm = LlamaRMSNorm(cfg["hidden"], cfg["eps"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Llama decoder stack; `forward(input_ids)` returns the final normed hidden states."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab"], cfg["hidden"])
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg["layers"]))
        self.norm = LlamaRMSNorm(cfg["hidden"], cfg["eps"])
        self.rotary_emb = LlamaRotaryEmbedding(cfg["hidden"] // cfg["heads"], cfg["rope_theta"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(input_ids.shape[1], input_ids.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


def _build(cfg: dict) -> LlamaModel:
    return init_weights_(LlamaModel(cfg))  # RMSNorm weights start at 1 from the constructor


def _batch(cfg: dict, gen: torch.Generator) -> tuple:
    # Ids 0-2 are <unk>, <s>, </s> in Llama's tokenizer.
    return (random_ids(gen, cfg["batch"], cfg["seq"], cfg["vocab"], low=3),)


def _validate(cfg: dict) -> None:
    check_heads(cfg)
    if (cfg["hidden"] // cfg["heads"]) % 2:
        raise ValueError("head size (hidden / heads) must be even for rotary embeddings")
    if cfg["vocab"] <= 3:
        raise ValueError("vocab must exceed 3 (ids 0-2 are special tokens)")


_example, _calibration = token_spec_fns(_batch)

ZOO = {
    "llama-tiny": Spec(
        description="Small Llama decoder (SwiGLU, RMSNorm, rotary; hidden 256, 4 layers), random init",
        defaults={
            "hidden": 256, "layers": 4, "heads": 4, "ffn": 688, "vocab": 32000,
            "eps": 1e-6, "rope_theta": 10000.0, "batch": 1, "seq": 16,
        },
        build=_build, example=_example, calibration=_calibration,
        inputs="(input_ids [batch, seq] int64,) positional",
        validate=_validate,
    ),
}
