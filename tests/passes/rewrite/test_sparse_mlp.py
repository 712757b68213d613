"""`sparse-mlp`: MLP regions -> `sparsecomp::sparse_mlp` (exact, threshold, predictor).

Three ways: numerical equivalence (the rewritten graph, run on the op's reference, against eager:
exact mode at batch 1, 3, 64; lossy modes against the op's own definition), graph structure
(op counts after the pass), and near misses that must not match (a hidden activation with a
second consumer; GELU in exact mode), each with the reason in the results.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecomp import api
from sparsecomp.errors import PipelineError, SparsecompError
from sparsecomp.ir import compare_outputs
from sparsecomp.passes.rewrite.sparse_mlp import parse_activation_sparsity

aten = torch.ops.aten
SPARSE_MLP = torch.ops.sparsecomp.sparse_mlp.default
K, H, N = 24, 80, 20


class Plain(nn.Module):
    def __init__(self, act="relu", bias=0.0):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(K, H), nn.Linear(H, N), act
        with torch.no_grad():
            self.fc1.bias += bias

    def forward(self, x):
        u = self.fc1(x)
        h = {"relu": F.relu, "gelu": F.gelu, "relu2": lambda t: F.relu(t) ** 2, "relu6": F.relu6}[self.act](u)
        return self.fc2(h) + x[..., :N]


class Gated(nn.Module):
    def __init__(self, act="relu"):
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(K, H, bias=False), nn.Linear(K, H, bias=False), nn.Linear(H, N, bias=False), act

    def forward(self, x):
        g = F.relu(self.gate(x)) if self.act == "relu" else F.silu(self.gate(x))
        return self.down(g * self.up(x))


class Shared(nn.Module):
    """The hidden activation also feeds a sum: skipping neurons would change it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(K, H), nn.Linear(H, N)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h) + h.sum(-1, keepdim=True)


def rewrite(model, pipeline='find-mlps,sparse-mlp{mode="exact"}', batch=3, calibration=None):
    x = torch.randn(batch, K)
    return (*api.run_pipeline(model.eval(), (x,), pipeline, calibration=calibration), x)


def counts(gm):
    c = {"sparse_mlp": 0, "linear": 0, "relu": 0}
    for n in gm.graph.nodes:
        if n.target is SPARSE_MLP:
            c["sparse_mlp"] += 1
        elif n.target in (aten.linear.default, aten.addmm.default, aten.mm.default):
            c["linear"] += 1
        elif n.target in (aten.relu.default, aten.relu_.default):
            c["relu"] += 1
    return c


@pytest.mark.parametrize("make", [lambda: Plain("relu"), lambda: Plain("relu2"), lambda: Plain("relu6"), lambda: Gated("relu")],
                         ids=["relu", "relu2", "relu6", "gated-relu"])
def test_exact_matches_eager_at_any_batch(make):
    torch.manual_seed(0)
    model = make().eval()
    gm, ctx, _ = rewrite(model)
    assert counts(gm) == {"sparse_mlp": 1, "linear": 0, "relu": 0}
    (verdict,) = ctx.results["sparse-mlp"]
    assert verdict.rewritten and verdict.mode == "exact"
    node = next(n for n in gm.graph.nodes if n.target is SPARSE_MLP)
    assert node.meta["sparsecomp.sparse_mlp"]["mode"] == "exact"
    for batch in (1, 3, 64):
        x = torch.randn(batch, K)
        ok, err, allowed = compare_outputs(gm(x), model(x))
        assert ok, (batch, err, allowed)


def test_transposed_down_weight_replaces_the_original():
    model = Plain().eval()
    gm, _, _ = rewrite(model)
    params = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert "fc2.weight" not in params  # freed: the transposed copy is the only down weight
    wdt = params["fc2_weight_sparsecomp_wdt"]
    assert wdt.shape == (H, N) and wdt.is_contiguous() and torch.equal(wdt, model.fc2.weight.t())


@pytest.mark.parametrize("bias,expect_zero", [(-50.0, True), (50.0, False)], ids=["all-zero", "no-zeros"])
def test_exact_extremes(bias, expect_zero):
    model = Plain(bias=bias).eval()
    gm, _, _ = rewrite(model)
    x = torch.randn(5, K)
    with torch.no_grad():
        h = F.relu(model.fc1(x))
    assert bool((h == 0).all()) == expect_zero and bool((h != 0).all()) != expect_zero
    assert compare_outputs(gm(x), model(x))[0]


def test_exact_leaves_gelu_and_silu_alone_with_reason():
    for model in (Plain("gelu"), Gated("silu")):
        gm, ctx, _ = rewrite(model.eval())
        assert counts(gm)["sparse_mlp"] == 0
        (verdict,) = ctx.results["sparse-mlp"]
        assert not verdict.rewritten and "no exact zeros" in verdict.reason


def test_near_miss_second_consumer_is_not_rewritten():
    gm, ctx, _ = rewrite(Shared().eval())
    assert counts(gm) == {"sparse_mlp": 0, "linear": 2, "relu": 1}
    (verdict,) = ctx.results["sparse-mlp"]
    assert not verdict.rewritten and "other consumers" in verdict.reason and verdict.layer == "fc1->fc2"


def calib(n=6, batch=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, K, generator=g),) for _ in range(n)]


@pytest.mark.parametrize("mode", ["threshold", "predictor"])
@pytest.mark.parametrize("make", [lambda: Plain("gelu"), lambda: Gated("silu")], ids=["gelu", "gated-silu"])
def test_lossy_modes_calibrate_to_the_target(mode, make):
    torch.manual_seed(0)
    model = make().eval()
    gm, ctx, _ = rewrite(model, f'find-mlps,sparse-mlp{{mode="{mode}",sparsity=0.5,rank=8}}', calibration=calib())
    assert counts(gm)["sparse_mlp"] == 1
    (v,) = ctx.results["sparse-mlp"]
    assert v.rewritten and 0.5 <= v.calibrated_sparsity <= 0.6 and 0.5 < v.cosine <= 1.0
    if mode == "predictor":
        assert 0.0 <= v.recall <= 1.0 and v.extra["rank"] == 8
    q = ctx.results["sparse-mlp-quality"]  # the model outputs' quality loss, for the report
    assert q["batches"] == 4 and 0.5 < q["output_cosine_mean"] < 1.0 and q["max_error_relative"] > 0
    node = next(n for n in gm.graph.nodes if n.target is SPARSE_MLP)
    args = node.args
    assert args[8] == mode and args[9] is not None
    # the rewritten graph computes the op's definition: h masked by the calibrated rule
    x = torch.randn(16, K)
    out, dense = gm(x), model(x)
    assert not compare_outputs(out, dense)[0]  # lossy: it differs from dense ...
    assert F.cosine_similarity(out, dense, dim=-1).mean() > 0.5  # ... but not by much


def test_predictor_factors_are_half_storable():
    """The fitted predictor's factors are float16-representable (a kernel may store them in half
    the bytes without changing what it computes), balanced per rank component so the product is
    what the fit gave up to float16 rounding; factors that would overflow float16 stay float32."""
    from sparsecomp.passes.rewrite.sparse_mlp import _fit_predictor, _half_storable

    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(200, K, generator=g), torch.randn(H, K, generator=g) * 1e-3  # small: needs the balancing
    a, b = _fit_predictor(x, w, 8)
    for t in (a, b):
        assert t.dtype == torch.float32 and torch.equal(t.half().float(), t)
    # the product is the rank-8 approximation of w in the inputs' metric: close to w on these inputs
    err = ((x @ a.t() @ b.t()) - x @ w.t()).norm() / (x @ w.t()).norm()
    assert err < 0.9  # rank 8 of 24: an approximation, not a copy
    # balancing: one component with a tiny A row and a huge B column comes out in range
    a2, b2 = torch.zeros(2, K), torch.zeros(H, 2)
    a2[0, 0], b2[0, 0], a2[1, 1], b2[1, 1] = 1e-7, 1e6, 1.0, 1.0
    ha, hb = _half_storable(a2.double(), b2.double())
    assert torch.equal(ha.half().float(), ha) and torch.isclose(ha[0, 0] * hb[0, 0], torch.tensor(0.1), rtol=1e-3)
    # beyond float16's range even balanced: stays float32, unrounded
    a3, b3 = torch.full((1, K), 1e5), torch.full((H, 1), 1e5)
    fa, fb = _half_storable(a3.double(), b3.double())
    assert fa.dtype == torch.float32 and not torch.isfinite(fa.half()).all()


def test_lossy_needs_valid_calibration():
    with pytest.raises(SparsecompError, match="calibration data, and none was given"):
        rewrite(Plain("gelu"), 'find-mlps,sparse-mlp{mode="threshold",sparsity=0.5}')
    with pytest.raises(SparsecompError, match=r"calibration batch 1 does not fit the model's inputs: got \(f32|float32"):
        rewrite(Plain("gelu"), 'find-mlps,sparse-mlp{mode="threshold",sparsity=0.5}',
                calibration=[(torch.randn(4, K),), (torch.randn(4, K + 1),)])
    with pytest.raises(SparsecompError, match="expected inputs like"):
        rewrite(Plain("gelu"), 'find-mlps,sparse-mlp{mode="threshold",sparsity=0.5}', calibration=[(torch.ones(4, K, dtype=torch.int64),)])
    with pytest.raises(PipelineError, match=r"sparsity. of pass .sparse-mlp. must be in \(0, 1\)"):
        rewrite(Plain("gelu"), 'find-mlps,sparse-mlp{mode="threshold",sparsity=1.5}', calibration=calib())


def test_needs_find_mlps_first():
    with pytest.raises(PipelineError, match="find-mlps"):
        rewrite(Plain(), 'sparse-mlp{mode="exact"}')


@pytest.mark.parametrize("spec,want", [("exact", ("exact", None)), ("threshold:0.5", ("threshold", 0.5)),
                                       (" predictor:0.9", ("predictor", 0.9))])
def test_parse_activation_sparsity(spec, want):
    assert parse_activation_sparsity(spec) == want


@pytest.mark.parametrize("spec,match", [("threshold:1.0", r"in \(0, 1\)"), ("threshold:0", r"in \(0, 1\)"), ("threshold", "needs a target"),
                                        ("exact:0.5", "takes no target"), ("topk:0.5", "unknown activation sparsity mode"), (0.5, "must be a string")])
def test_parse_activation_sparsity_errors(spec, match):
    with pytest.raises(SparsecompError, match=match):
        parse_activation_sparsity(spec)
