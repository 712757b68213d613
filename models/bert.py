"""`bert-tiny` and `bert-base`: a compact BERT encoder in plain PyTorch, HF-compatible names.

What it is for: BERT-base (seq 128, batch 1) is the standard CPU sparse-inference benchmark
(DeepSparse, the sparse-BERT papers), so our speedups can be set beside published ones;
bert-tiny (Google's BERT-Tiny shape: hidden 128, 2 layers, 2 heads, FFN 512) is the same graph
small enough for every test. Post-LayerNorm, GELU FFN, no pooler: forward returns the last
hidden state [batch, seq, hidden].

Module names and parameter layout are exactly HuggingFace `BertModel`'s (`embeddings.*`,
`encoder.layer.{i}.attention.self.query`, ..., `encoder.layer.{i}.output.LayerNorm`), so:
layer globs written for one also match the other and the real `minilm` model; an HF BERT
state dict loads with `load_state_dict` (the pooler and HF's buffers aside); and the parity test
loads MiniLM's pretrained weights into this module and checks the outputs agree.

Inputs (keywords): `input_ids` [batch, seq] int64, `attention_mask` [batch, seq] int64 (1 = token,
0 = padding); optional `token_type_ids` (default all 0). Random ids avoid id 0, BERT's [PAD].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._spec import Spec, build_initialized, check_heads, random_ids, token_spec_fns

__all__ = ["BertModel", "ZOO"]


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg["vocab"], cfg["hidden"], padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg["max_pos"], cfg["hidden"])
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab"], cfg["hidden"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden"], eps=cfg["eps"])

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(token_type_ids)
        )
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.heads = cfg["heads"]
        self.query = nn.Linear(cfg["hidden"], cfg["hidden"])
        self.key = nn.Linear(cfg["hidden"], cfg["hidden"])
        self.value = nn.Linear(cfg["hidden"], cfg["hidden"])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # [b, s, h] -> [b, heads, s, head_dim]
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=mask
        )
        return ctx.transpose(1, 2).reshape(b, s, h)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["hidden"], cfg["hidden"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden"], eps=cfg["eps"])

    def forward(self, ctx: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(ctx) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["hidden"], cfg["ffn"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as HF's "gelu"


class BertOutput(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["ffn"], cfg["hidden"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden"], eps=cfg["eps"])

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg["layers"]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertModel(nn.Module):
    """BERT encoder without pooler; `forward(input_ids, attention_mask=None, token_type_ids=None)`
    returns the last hidden state [batch, seq, hidden]."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mask = None
        if attention_mask is not None:
            # [b, s] -> boolean [b, 1, 1, s], True = may attend; broadcasts over heads and queries.
            mask = attention_mask[:, None, None, :].to(torch.bool)
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask)


def _build(cfg: dict) -> BertModel:
    return build_initialized(lambda: BertModel(cfg))


def _batch(cfg: dict, gen: torch.Generator) -> dict:
    ids = random_ids(gen, cfg["batch"], cfg["seq"], cfg["vocab"], low=1)  # 0 is [PAD]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _validate(cfg: dict) -> None:
    check_heads(cfg)
    if cfg["seq"] > cfg["max_pos"]:
        raise ValueError(f"seq ({cfg['seq']}) exceeds max_pos ({cfg['max_pos']})")
    if cfg["vocab"] < 2:
        raise ValueError("vocab must be at least 2 (id 0 is padding)")


_example, _calibration = token_spec_fns(_batch)
_COMMON = {"vocab": 30522, "max_pos": 512, "type_vocab": 2, "eps": 1e-12, "batch": 1}
_INPUTS = "{input_ids: [batch, seq] int64, attention_mask: [batch, seq] int64} keywords"

ZOO = {
    "bert-tiny": Spec(
        description="BERT-Tiny encoder (hidden 128, 2 layers, 2 heads, FFN 512), random init",
        defaults={"hidden": 128, "layers": 2, "heads": 2, "ffn": 512, **_COMMON, "seq": 32},
        build=_build, example=_example, calibration=_calibration, inputs=_INPUTS,
        validate=_validate,
    ),
    "bert-base": Spec(
        description="BERT-base encoder (hidden 768, 12 layers, 12 heads, FFN 3072), random init",
        defaults={"hidden": 768, "layers": 12, "heads": 12, "ffn": 3072, **_COMMON, "seq": 128},
        build=_build, example=_example, calibration=_calibration, inputs=_INPUTS,
        validate=_validate,
    ),
}
