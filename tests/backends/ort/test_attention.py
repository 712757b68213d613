"""Self-attention over block-format projections, lowered on transposed heads (backends/ort/attention.py):
numerics against eager (batch 1 and 3, masks with padding and a fully masked item, ORT optimizations
on and off), the graph (no head Transposes, one If per site), and the sites that must stay as the
exporter writes them (a dense projection, causal attention, dropout)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sparsecomp.backends.ort import attention, files, session
from torch import nn

import sparsecomp as sc
from sparsecomp import patterns

HIDDEN, HEADS = 64, 4


class Attn(nn.Module):
    """One attention block as the zoo's BERT writes it: split heads, SDPA, merge, out-projection."""

    def __init__(self, causal=False, dropout=0.0, odd=False, share=None, own_sizes=False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.causal, self.dropout, self.odd, self.share, self.own_sizes = causal, dropout, odd, share, own_sizes

    def forward(self, x, mask=None):
        b, s, h = x.shape

        def split(t):
            if self.odd:  # halves of the sequence as separate items (valid, unusual): heads as usual, other meaning
                return t.view(2 * b, s // 2, HEADS, h // HEADS).transpose(1, 2)
            if self.own_sizes:  # sizes read from the projection itself
                return t.view(t.shape[0], t.shape[1], HEADS, h // HEADS).transpose(1, 2)
            return t.view(b, s, HEADS, h // HEADS).transpose(1, 2)

        q = split(self.q(x))
        k = q if self.share == "qk" else split(self.k(x))  # shared query-key attention (Reformer)
        v = k if self.share == "kv" else split(self.v(x))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, dropout_p=self.dropout)
        return self.o(ctx.transpose(1, 2).reshape(b, s, h)) + x


def model(sparse=("q", "k", "v", "o"), seed=0, **kw):
    torch.manual_seed(seed)
    m = Attn(**kw).eval()
    for name in sparse:
        patterns.impose(m, "block:16x1:0.9", name)
    return m


def key_mask(lengths, s):
    """Key padding mask [B, 1, 1, S] (True = may attend); length 0 masks a whole item."""
    return (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


def compiled(m, example, tmp_path):
    return sc.compile(m, example, backend="ort", kernels="bsr16x1", cache_dir=str(tmp_path / "cache"), max_seconds_per_layer=0.05)


def run(proto, inputs, optimize=True):
    s = session(proto, optimize=optimize)
    return torch.from_numpy(s.run(None, {i.name: t.numpy() for i, t in zip(s.get_inputs(), inputs)})[0])


def close(out, ref):
    return float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def count(graph, op):
    return sum(n.op_type == op for n in graph.node)


def ifs(proto):
    return [n for n in proto.graph.node if n.op_type == "If"]


def branch(node, name):
    return next(a.g for a in node.attribute if a.name == name)


def test_attention_runs_on_transposed_heads(tmp_path):
    m = model()
    x = torch.randn(2, 9, HIDDEN)
    cm = compiled(m, (x, key_mask([9, 6], 9)), tmp_path)
    proto = cm.gm.onnx_model
    assert any("self-attention block(s) run on transposed heads" in n for n in cm.report.notes)
    layouts = {r["layer"]: r.get("layout") for r in files.layers(proto)}
    assert layouts == {"q": {"x": "plain", "y": "transposed"}, "k": {"x": "plain", "y": "transposed"},
                       "v": {"x": "plain", "y": "transposed"}, "o": {"x": "transposed", "y": "plain"}}
    (site,) = ifs(proto)
    # outside the attention: q / k / v each transpose x (onnxruntime merges the three), o transposes y back;
    # the exporter's own split / K^T / merge Transposes and its Softmax are gone
    assert count(proto.graph, "Transpose") == 4 and count(proto.graph, "Softmax") == 0
    one, many = branch(site, "then_branch"), branch(site, "else_branch")
    assert count(one, "Transpose") == 2  # Q and P enter their MatMuls transposed (fused by onnxruntime)
    assert count(many, "Transpose") == 8  # + q, k, v, the mask, the context and its keep flags moved past the batch axis
    assert count(one, "Softmax") == count(many, "Softmax") == 1
    # the all-masked guard works on the mask (no IsNaN over the probabilities) and scales the context
    assert count(one, "IsNaN") == count(many, "IsNaN") == count(proto.graph, "IsNaN") == 0
    assert count(one, "Mul") == count(many, "Mul") == 2  # the scale, and the context by the keep flags
    # (a float input keeps its batch dim dynamic, not its sequence: capture's rule)
    cases = [(x, key_mask([9, 6], 9)), (torch.randn(1, 9, HIDDEN), key_mask([3], 9)),  # batch 1: the If's first branch
             (torch.randn(3, 9, HIDDEN), key_mask([7, 0, 2], 9)),  # a fully masked item: zeros from the attention
             (torch.zeros(1, 9, HIDDEN), key_mask([9], 9))]  # an all-zero input
    for inputs in cases:
        ref = m(*inputs)
        for optimize in (True, False):
            assert close(run(proto, inputs, optimize), ref)
        assert close(cm(*inputs), ref)
    # the fully masked item's attention is zeros, as eager's: what remains is o's bias plus the residual
    xb, mb = cases[2]
    assert torch.allclose(run(proto, cases[2])[1], m.o.bias + xb[1], atol=1e-5)
    # the dense view of the file (`sparsecomp bench model.onnx`'s baseline): plain layers, plain attention
    dense = files.dense_equivalent(proto)
    assert ifs(dense) == [] and count(dense.graph, "Softmax") == 1 and count(dense.graph, "Gather") == 0
    for inputs in cases:
        assert close(run(dense, inputs), m(*inputs))


def test_no_mask_and_a_float_mask(tmp_path):
    m = model(seed=1)
    x = torch.randn(1, 6, HIDDEN)
    proto = compiled(m, (x,), tmp_path).gm.onnx_model
    assert len(ifs(proto)) == 1 and count(proto.graph, "Softmax") == 0
    for xb in (x, torch.randn(4, 6, HIDDEN)):
        for optimize in (True, False):
            assert close(run(proto, (xb,), optimize), m(xb))
    additive = torch.zeros(2, 1, 8, 8).masked_fill(torch.rand(2, 1, 8, 8) < 0.3, float("-inf"))
    additive[..., 0] = 0.0  # every query keeps a key
    x = torch.randn(2, 8, HIDDEN)
    proto = compiled(m, (x, additive), tmp_path / "f").gm.onnx_model
    assert len(ifs(proto)) == 1
    for optimize in (True, False):
        assert close(run(proto, (x, additive), optimize), m(x, additive))
        assert close(run(proto, (x[:1], additive[:1]), optimize), m(x[:1], additive[:1]))
    square = additive[0, 0]  # [S, S]: broadcast over batch and heads
    proto = compiled(m, (x, square), tmp_path / "s").gm.onnx_model
    assert len(ifs(proto)) == 1
    for model_ in (proto, files.dense_equivalent(proto)):
        for xb in (x, x[:1]):
            assert close(run(model_, (xb, square)), m(xb, square))


def test_a_dense_out_projection_gets_the_context_back_plain(tmp_path):
    m = model(sparse=("q", "k", "v"), seed=2)
    x = torch.randn(2, 5, HIDDEN)
    proto = compiled(m, (x, key_mask([5, 2], 5)), tmp_path).gm.onnx_model
    (site,) = ifs(proto)
    assert "o" not in {r["layer"] for r in files.layers(proto)}  # o stays the exporter's dense MatMul
    assert count(branch(site, "then_branch"), "Transpose") == 3  # the context leaves as [S, H, D] -> [B, S, H*D]
    for inputs in ((x, key_mask([5, 2], 5)), (x[:1], key_mask([4], 5)), (torch.randn(3, 5, HIDDEN), key_mask([1, 5, 0], 5))):
        for optimize in (True, False):
            assert close(run(proto, inputs, optimize), m(*inputs))


def test_sizes_read_from_the_projections_are_read_from_their_input(tmp_path):
    m = model(seed=4, own_sizes=True)
    x = torch.randn(2, 6, HIDDEN)
    proto = compiled(m, (x, key_mask([6, 4], 6)), tmp_path).gm.onnx_model
    assert len(ifs(proto)) == 1
    for inputs in ((x, key_mask([6, 4], 6)), (x[1:], key_mask([2], 6))):
        for optimize in (True, False):
            assert close(run(proto, inputs, optimize), m(*inputs))


@pytest.mark.parametrize("case", ["dense key", "causal", "dropout", "odd split", "shared qk", "shared kv"])
def test_sites_that_must_not_be_fused(case, tmp_path):
    kw = {"causal": {"causal": True}, "dropout": {"dropout": 0.1}, "odd split": {"odd": True},
          "shared qk": {"share": "qk"}, "shared kv": {"share": "kv"}}.get(case, {})
    sparse = ("q", "v", "o") if case == "dense key" else ("q", "k", "v", "o")
    m = model(sparse=sparse, seed=3, **kw)
    x = torch.randn(2, 6, HIDDEN)
    if case == "dropout":  # SDPA's dropout applies whatever the mode: this site can only be left as it is
        gm = sc.capture(m, (x,))
        gm = getattr(gm, "gm", gm)
        assert attention.fuse_sites(gm, {n.name: True for n in gm.graph.nodes}) == []
        return
    cm = compiled(m, (x,), tmp_path)
    proto = cm.gm.onnx_model
    assert ifs(proto) == [] and count(proto.graph, "Softmax") == 1  # the exporter's attention, as before
    assert not any("transposed heads" in n for n in cm.report.notes)
    for xb in (x, torch.randn(1, 6, HIDDEN)):
        assert close(run(proto, (xb,)), m(xb))


def test_fuse_sites_replaces_the_split_attention_and_merge():
    m = model()
    x, mask = torch.randn(2, 5, HIDDEN), key_mask([5, 3], 5)
    gm = sc.capture(m, (x, mask))
    gm = getattr(gm, "gm", gm)
    linears = [n.name for n in gm.graph.nodes if str(n.target) == "aten.linear.default"]
    chains = dict.fromkeys(linears, True)
    before = {str(n.target) for n in gm.graph.nodes}
    assert "aten.scaled_dot_product_attention.default" in before
    (site,) = attention.fuse_sites(gm, chains)
    gm.recompile()
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(attention.ATTENTION) == 1
    assert not {"aten.scaled_dot_product_attention.default", "aten.transpose.int", "aten.view.default"} & set(targets)
    assert (site.heads, site.head_dim, site.mask, site.mask_rank) == (HEADS, HIDDEN // HEADS, "bool", 4)
    assert site.scale == pytest.approx(1 / np.sqrt(HIDDEN // HEADS))
    # the op's reference is the attention it replaced (run with the real weights: the linears are still aten ops)
    assert torch.allclose(gm(x, mask), m(x, mask), atol=1e-6)
    # a projection that does not chain (its layer not a block format) leaves the site alone
    gm2 = getattr(sc.capture(m, (x, mask)), "gm", None) or sc.capture(m, (x, mask))
    assert attention.fuse_sites(gm2, chains | {linears[1]: False}) == []


def test_transformers_attention_is_fused_too(tmp_path):
    """The real MiniLM (transformers' SDPA attention: an identity reshape before the merge's
    transpose), padded sentences: one site per layer, eager's outputs at batch 2 and batch 1."""
    from sparsecomp import models

    m, ex = models.get("minilm", layers=1, max_length=16)
    sc.impose(m, "block:16x1:0.9")
    cm = sc.compile(m, ex, backend="ort", kernels="bsr16x1", cache_dir=str(tmp_path / "cache"), max_seconds_per_layer=0.05)
    proto = cm.gm.onnx_model
    assert len(ifs(proto)) == 1 and count(proto.graph, "Softmax") == 0
    assert bool((ex["attention_mask"] == 0).any())  # the example has padding
    for batch in (ex, {k: v[:1] for k, v in ex.items()}):
        with torch.no_grad():
            ref = m(**batch)
        ref = getattr(ref, "last_hidden_state", ref[0] if isinstance(ref, (tuple, list)) else ref)
        for optimize in (True, False):
            s = session(proto, optimize=optimize)
            out = s.run(None, {i.name: batch[i.name].numpy() for i in s.get_inputs()})[0]
            assert close(torch.from_numpy(out), ref)


@pytest.mark.parametrize("batch", [1, 2])
def test_static_shapes_need_no_if(batch, tmp_path):
    """With the batch size fixed by the export (dynamic_axes=None), only the branch that applies is written."""
    import onnx

    m = model(seed=5)
    x, mask = torch.randn(batch, 7, HIDDEN), key_mask([7, 3][:batch], 7)
    cm = compiled(m, (x, mask), tmp_path)
    info = sc.export_onnx(cm, (x, mask), tmp_path / "static.onnx", dynamic_axes=None)
    proto = onnx.load(info["path"])
    assert ifs(proto) == [] and count(proto.graph, "Softmax") == 1
    assert count(proto.graph, "Transpose") == 4 + (2 if batch == 1 else 8)  # the layers' own + the one branch's
    for optimize in (True, False):
        assert close(run(proto, (x, mask), optimize), m(x, mask))
