"""Every zoo model through compile(backend="ort"): onnxruntime on sparsecomp's export equals eager
within 1e-4 x max|output|, with graph optimizations on and off (ORT_DISABLE_ALL), at the example
shape and at another batch / sequence length.

Models run at test size (their layers repeat, so depth and width add time, not coverage); every
Linear is imposed 90% unstructured and the sparse layers are forced onto the sparse lowerings
(`kernels=`), so the ONNX decompositions themselves are what is checked, on every model's real
graph (attention, convolutions as 1x1 sparse_linear, embeddings, norms). The transformers run
again with 16x1 blocks on block kernels, where the bidirectional ones' attention runs on the block
layers' transposed outputs. minilm needs the `hf` extra and is skipped cleanly without it.
"""

import pytest
import torch
from sparsecomp.backends.ort import session

import sparsecomp as sc
from sparsecomp import models
from sparsecomp.ir import normalize_inputs
from zoo_cases import SMALL, other_shape  # the zoo at test size, shared with tests/backends/torch/test_zoo.py

KERNELS = {"resnet18-like": "sell4,bsr16x1-b4", "vit-tiny": "bsr4x4,sell4"}  # default: sell4 (any pattern)


def test_every_zoo_model_is_covered():  # (the table both backends' matrices run)
    assert set(SMALL) == set(models.names())


def _leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _leaves(v)]
    return [t for t in _leaves(out.to_tuple())] if hasattr(out, "to_tuple") else []


@pytest.mark.parametrize("name", list(SMALL))
def test_zoo_model_matches_eager_in_onnxruntime(name, tmp_path):
    try:
        model, example = models.get(name, **SMALL[name])
    except models.MissingExtraError as err:
        pytest.skip(str(err))
    imposed = sc.impose(model, "unstructured:0.9")
    assert imposed
    cm = sc.compile(model, example, backend="ort", kernels=KERNELS.get(name, "sell4"), cache_dir=str(tmp_path),
                    max_seconds_per_layer=0.02, name=name)
    assert cm.report.verify["ok"], cm.report.verify
    if name != "resnet18-like":  # its 1x1 convs have stride 2 and its head < 16 classes: nothing to lower
        assert any(r["decision"] == "sparse" for r in cm.report.rows)
    _assert_matches_eager(name, model, example, cm.gm)


def _assert_matches_eager(name, model, example, module):
    """The compiled module's sessions (optimized, ORT_DISABLE_ALL) against eager, at the example
    shape and at another batch / sequence length."""
    sessions = {"optimized": module.session, "ORT_DISABLE_ALL": session(module.onnx_model, optimize=False)}
    for args, kwargs in (normalize_inputs(example), other_shape(example)):
        with torch.no_grad():
            refs = _leaves(model(*args, **kwargs))
        feeds = module.feeds(args, kwargs)
        for label, sess in sessions.items():
            outs = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
            assert len(outs) == len(refs)
            for out, ref in zip(outs, refs):
                out = torch.from_numpy(out)
                assert out.shape == ref.shape, (label, out.shape, ref.shape)
                err = float((out - ref).abs().max())
                assert err <= 1e-4 * float(ref.abs().max()), (name, label, tuple(ref.shape), err)


FUSED = {"bert-tiny": True, "bert-base": True, "minilm": True,  # bidirectional self-attention
         "opt-125m-like": False, "llama-tiny": False,  # causal: the exporter's attention
         "vit-tiny": False}  # q, k and v from one fused Linear


@pytest.mark.parametrize("name", list(FUSED))
def test_zoo_attention_with_block_weights(name, tmp_path):
    """16x1 blocks on every Linear, block kernels forced: where the attention's q / k / v run them,
    the attention runs on their transposed outputs (backends/ort/attention.py); eager's outputs either way."""
    try:
        model, example = models.get(name, **SMALL[name])
    except models.MissingExtraError as err:
        pytest.skip(str(err))
    sc.impose(model, "block:16x1:0.9")
    cm = sc.compile(model, example, backend="ort", kernels="bsr16x1", cache_dir=str(tmp_path), max_seconds_per_layer=0.02, name=name)
    sites = sum(n.op_type == "If" for n in cm.gm.onnx_model.graph.node)
    assert sites == (SMALL[name]["layers"] if FUSED[name] else 0), sites
    _assert_matches_eager(name, model, example, cm.gm)
