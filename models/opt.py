"""`opt-125m-like`: a ReLU decoder with OPT-125m's shapes, in plain PyTorch, OPT's module names.

What it is for: ReLU decoders (OPT) are where activation sparsity is real: after fc1 + ReLU most
of fc2's input is zero (Deja Vu, "ReLU strikes back"), so this is the model for the
`activation_sparsity=` rewrites and the decoding-step (batch 1, few tokens) benchmarks. OPT-125m
is the smallest real OPT, so the shapes (hidden 768, 12 layers, 12 heads, FFN 3072, vocab 50272,
2048 learned positions) match published numbers without a multi-GB download.

Structure as HF `OPTModel` (OPT-125m config: pre-LayerNorm, causal attention, biases everywhere,
learned positions offset by 2, no embedding projection): `decoder.embed_tokens`,
`decoder.embed_positions`, `decoder.layers.{i}.self_attn.{q,k,v,out}_proj`,
`decoder.layers.{i}.self_attn_layer_norm`, `decoder.layers.{i}.fc1`, `.fc2`,
`decoder.layers.{i}.final_layer_norm`, `decoder.final_layer_norm`. Forward takes `input_ids`
[batch, seq] (no padding: positions are 0..seq-1) and returns the final hidden states
[batch, seq, hidden], no LM head.

`mlp_bias` (default 0) is added to every fc1 bias. With this init fc1's pre-activations are
about N(0, 0.55^2) (LayerNorm output times N(0, 0.02^2) weights over 768 inputs), so
`mlp_bias=-0.7` makes about 90% of the ReLU outputs zero, like a trained OPT's MLPs; measured
here: 0.0 -> 50%, -0.7 -> ~90%.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._spec import Spec, build_initialized, check_heads, random_ids, token_spec_fns

__all__ = ["OPTModel", "ZOO"]

# OPT's learned position table starts at index 2 (a fairseq legacy: ids 0 and 1 were reserved
# for padding), so position p reads row p + 2. Kept so HF OPT weights load unchanged.
POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True
        )
        return self.out_proj(ctx.transpose(1, 2).reshape(b, s, h))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self_attn = OPTAttention(cfg["hidden"], cfg["heads"])
        self.self_attn_layer_norm = nn.LayerNorm(cfg["hidden"])
        self.fc1 = nn.Linear(cfg["hidden"], cfg["ffn"])
        self.fc2 = nn.Linear(cfg["ffn"], cfg["hidden"])
        self.final_layer_norm = nn.LayerNorm(cfg["hidden"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))


class OPTDecoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab"], cfg["hidden"], padding_idx=1)
        self.embed_positions = nn.Embedding(cfg["max_pos"] + POSITION_OFFSET, cfg["hidden"])
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg) for _ in range(cfg["layers"]))
        self.final_layer_norm = nn.LayerNorm(cfg["hidden"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + POSITION_OFFSET
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)[None]
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class OPTModel(nn.Module):
    """OPT decoder stack; `forward(input_ids)` returns the final hidden states."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.decoder = OPTDecoder(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids)


def _build(cfg: dict) -> OPTModel:
    model = build_initialized(lambda: OPTModel(cfg))
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.fc1.bias += cfg["mlp_bias"]
    return model


def _batch(cfg: dict, gen: torch.Generator) -> tuple:
    # Ids 0-3 are <s>, <pad>, </s>, <unk> in OPT's vocabulary.
    return (random_ids(gen, cfg["batch"], cfg["seq"], cfg["vocab"], low=4),)


def _validate(cfg: dict) -> None:
    check_heads(cfg)
    if cfg["seq"] > cfg["max_pos"]:
        raise ValueError(f"seq ({cfg['seq']}) exceeds max_pos ({cfg['max_pos']})")
    if cfg["vocab"] <= 4:
        raise ValueError("vocab must exceed 4 (ids 0-3 are special tokens)")


_example, _calibration = token_spec_fns(_batch)

ZOO = {
    "opt-125m-like": Spec(
        description="ReLU decoder with OPT-125m shapes (768 hidden, 12 layers, FFN 3072), random init",
        defaults={
            "hidden": 768, "layers": 12, "heads": 12, "ffn": 3072, "vocab": 50272,
            "max_pos": 2048, "batch": 1, "seq": 8, "mlp_bias": 0.0,
        },
        build=_build, example=_example, calibration=_calibration,
        inputs="(input_ids [batch, seq] int64,) positional",
        validate=_validate,
    ),
}
