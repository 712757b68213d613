"""The zoo's public API: names, info, get, calibration, seeding, overrides and errors."""

import pytest
import torch

from sparsecomp.models import MissingExtraError, ZooEntry, calibration, get, info, names

EXPECTED = ["mlp-relu", "bert-tiny", "bert-base", "opt-125m-like", "llama-tiny", "vit-tiny",
            "resnet18-like", "minilm"]
# Small variants so the whole file runs in seconds; the full sizes are checked once below.
SMALL = {
    "mlp-relu": {"hidden": 64, "ffn": 256},
    "bert-tiny": {"layers": 1},
    "bert-base": {"layers": 1, "hidden": 64, "heads": 4, "ffn": 128, "vocab": 500, "seq": 16},
    "opt-125m-like": {"layers": 1, "hidden": 64, "heads": 4, "ffn": 128, "vocab": 500},
    "llama-tiny": {"layers": 1, "hidden": 64, "ffn": 96, "vocab": 500},
    "vit-tiny": {"layers": 1, "image": 32},
    "resnet18-like": {"image": 32, "width": 8, "classes": 10},
}
RANDOM_MODELS = list(SMALL)
SPECIAL_IDS = {"bert-tiny": 1, "bert-base": 1, "opt-125m-like": 4, "llama-tiny": 3}


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _flat(inputs):
    return list(inputs.items()) if isinstance(inputs, dict) else list(enumerate(inputs))


def test_names_and_info():
    assert names() == EXPECTED
    for name in names():
        entry = info(name)
        assert isinstance(entry, ZooEntry) and entry.name == name
        assert entry.description and "\n" not in entry.description
        assert entry.inputs
        assert entry.needs_hf == (name == "minilm")
    assert info("bert-base").config["hidden"] == 768
    with pytest.raises(TypeError):  # the defaults cannot be edited through info()
        info("bert-base").config["hidden"] = 1


def test_unknown_name_lists_all_names():
    with pytest.raises(ValueError) as exc:
        get("bert-huge")
    for name in EXPECTED:
        assert name in str(exc.value)
    with pytest.raises(ValueError):
        info("nope")
    with pytest.raises(ValueError):
        calibration("nope", 1)


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ValueError) as exc:
        get("bert-tiny", depth=3)
    msg = str(exc.value)
    assert "depth" in msg and all(k in msg for k in info("bert-tiny").config)


@pytest.mark.parametrize("overrides", [
    {"layers": 0}, {"layers": "two"}, {"layers": 1.5}, {"layers": True},
    {"hidden": 100, "heads": 3},  # not divisible
    {"seq": 1000},  # beyond max_pos
])
def test_bad_override_values(overrides):
    with pytest.raises(ValueError):
        get("bert-tiny", **overrides)


def test_string_overrides_are_converted():
    model, example = get("bert-tiny", layers="1", seq="8")  # as a CLI would pass them
    assert len(model.encoder.layer) == 1 and example["input_ids"].shape == (1, 8)
    model, _ = get("mlp-relu", hidden=16, ffn=32, mlp_bias="-0.5")
    ref, _ = get("mlp-relu", hidden=16, ffn=32)
    torch.testing.assert_close(model.fc1.bias, ref.fc1.bias - 0.5)


@pytest.mark.parametrize("name", RANDOM_MODELS)
def test_model_contract(name):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    model, example = get(name, **SMALL[name])
    assert torch.equal(torch.get_rng_state(), before), "get() must not disturb the global RNG"
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(example, (tuple, dict))
    out = _call(model, example)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.shape[0] == _flat(example)[0][1].shape[0]  # batch first


@pytest.mark.parametrize("name", RANDOM_MODELS)
def test_seeded_determinism(name):
    m1, x1 = get(name, seed=7, **SMALL[name])
    m2, x2 = get(name, seed=7, **SMALL[name])
    m3, x3 = get(name, seed=8, **SMALL[name])
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(_flat(x1), _flat(x2)))
    assert not all(torch.equal(s1[k], s3[k]) for k in s1 if s1[k].is_floating_point())
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(_flat(x1), _flat(x3)))


def test_default_dtype_is_ignored():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, example = get("mlp-relu", **SMALL["mlp-relu"])
    finally:
        torch.set_default_dtype(old)
    assert model.fc1.weight.dtype == torch.float32 and example[0].dtype == torch.float32
    ref, _ = get("mlp-relu", **SMALL["mlp-relu"])
    assert torch.equal(model.fc1.weight, ref.fc1.weight)


def test_overrides_change_the_model():
    model, example = get("opt-125m-like", layers=2, hidden=64, heads=4, ffn=96, vocab=300, batch=3, seq=5)
    assert len(model.decoder.layers) == 2
    assert model.decoder.layers[0].fc1.weight.shape == (96, 64)
    assert example[0].shape == (3, 5)
    assert _call(model, example).shape == (3, 5, 64)
    model, example = get("mlp-relu", hidden=32, ffn=64, batch=4)
    assert example[0].shape == (4, 32) and _call(model, example).shape == (4, 32)
    model, example = get("vit-tiny", layers=1, image=64, patch=16, classes=7, batch=2)
    assert example[0].shape == (2, 3, 64, 64) and _call(model, example).shape == (2, 7)


def test_mlp_bias_shifts_fc1_only():
    small = SMALL["opt-125m-like"]
    ref, _ = get("opt-125m-like", **small)
    shifted, _ = get("opt-125m-like", mlp_bias=-0.7, **small)
    sd_ref, sd = ref.state_dict(), shifted.state_dict()
    for key in sd:
        if key.endswith("fc1.bias"):
            torch.testing.assert_close(sd[key], sd_ref[key] - 0.7)
        else:
            assert torch.equal(sd[key], sd_ref[key]), key


def test_names_follow_upstream_conventions():
    bert = dict(get("bert-tiny")[0].named_modules())
    for suffix in ("attention.self.query", "attention.self.key", "attention.self.value",
                   "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                   "output.dense", "output.LayerNorm"):
        assert f"encoder.layer.1.{suffix}" in bert
    for n in ("embeddings.word_embeddings", "embeddings.position_embeddings",
              "embeddings.token_type_embeddings", "embeddings.LayerNorm"):
        assert n in bert
    opt = dict(get("opt-125m-like", **SMALL["opt-125m-like"])[0].named_modules())
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert f"decoder.layers.0.self_attn.{n}" in opt
    assert "decoder.layers.0.fc1" in opt and "decoder.layers.0.fc2" in opt
    llama = dict(get("llama-tiny", **SMALL["llama-tiny"])[0].named_modules())
    assert {"layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"} <= set(llama)
    resnet = dict(get("resnet18-like", **SMALL["resnet18-like"])[0].named_modules())
    assert {"conv1", "bn1", "layer2.0.downsample.0", "layer4.1.conv2", "fc"} <= set(resnet)


@pytest.mark.parametrize("name", RANDOM_MODELS)
def test_calibration_structure(name):
    _, example = get(name, **SMALL[name])
    batches = calibration(name, 3, **SMALL[name])
    assert len(batches) == 3
    for batch in batches:
        assert type(batch) is type(example)
        for (k1, a), (k2, b) in zip(_flat(batch), _flat(example)):
            assert k1 == k2 and a.shape == b.shape and a.dtype == b.dtype
        assert not torch.equal(_flat(batch)[0][1], _flat(example)[0][1])
        if name in SPECIAL_IDS:
            ids = _flat(batch)[0][1]
            assert ids.min() >= SPECIAL_IDS[name]
    again = calibration(name, 2, **SMALL[name])  # deterministic, and a prefix of the longer run
    for b1, b2 in zip(again, batches):
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(_flat(b1), _flat(b2)))
    other = calibration(name, 1, seed=1, **SMALL[name])[0]
    assert not torch.equal(_flat(other)[0][1], _flat(batches[0])[0][1])
    assert calibration(name, 0, **SMALL[name]) == []


def test_calibration_honours_overrides_and_rejects_bad_n():
    batches = calibration("bert-tiny", 2, batch=4, seq=9)
    assert all(b["input_ids"].shape == (4, 9) for b in batches)
    with pytest.raises(ValueError):
        calibration("bert-tiny", -1)
    with pytest.raises(ValueError):
        calibration("bert-tiny", 1, nope=1)


def test_missing_extra_error_is_an_import_error():
    assert issubclass(MissingExtraError, ImportError)


def test_full_size_bert_base_and_opt():
    """The standard sizes: parameter counts as published (no pooler, no LM head)."""
    bert, example = get("bert-base")
    assert example["input_ids"].shape == (1, 128) and example["attention_mask"].shape == (1, 128)
    total = sum(p.numel() for p in bert.parameters())
    encoder = sum(p.numel() for n, p in bert.named_parameters() if n.startswith("encoder."))
    assert total == 108_891_648  # HF bert-base-uncased 109,482,240 minus the pooler (590,592)
    assert encoder == 85_054_464
    assert len(bert.encoder.layer) == 12
    del bert
    opt, example = get("opt-125m-like")
    assert example[0].shape == (1, 8)
    assert sum(p.numel() for p in opt.parameters()) == 125_239_296  # facebook/opt-125m
    assert _call(opt, example).shape == (1, 8, 768)


def test_zoo_imports_nothing_else_from_sparsecomp():
    """Dependencies point one way: the face imports the zoo, never the reverse."""
    import ast
    from pathlib import Path

    import sparsecomp.models as zoo

    for path in Path(zoo.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""] if node.level == 0 else []
            else:
                continue
            assert not any(m.split(".")[0] in {"sparsecomp", "passes", "backends"} for m in mods), path
