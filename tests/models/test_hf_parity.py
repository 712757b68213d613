"""Our OPT and Llama compute what HF's do, with HF's parameter names (state dicts load as-is).

Random-init HF models built from small configs (nothing is downloaded). This is what makes the
zoo's "OPT-style" and "Llama-style" claims checkable: same names, same function.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsecomp.models import get  # noqa: E402


def _load_and_compare(ours, hf, ids):
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and all("rotary_emb" in k for k in unexpected), (missing, unexpected)
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
        out = ours(ids)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_opt_matches_hf_opt():
    cfg = transformers.OPTConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=True,
        dropout=0.0, attention_dropout=0.0, activation_function="relu",
    )
    hf = transformers.OPTModel(cfg).eval()
    ours, (ids,) = get("opt-125m-like", vocab=300, hidden=64, layers=2, ffn=128, heads=4,
                       max_pos=64, seq=10, batch=2)
    _load_and_compare(ours, hf, ids)


def test_llama_matches_hf_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6,
        max_position_embeddings=64,
    )
    hf = transformers.LlamaModel(cfg).eval()
    ours, (ids,) = get("llama-tiny", vocab=300, hidden=64, layers=2, ffn=96, heads=4, seq=10, batch=2)
    _load_and_compare(ours, hf, ids)
