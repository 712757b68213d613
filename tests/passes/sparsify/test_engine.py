"""Which layers are pruned, allocation budgets, and bad input: a clear message, never a half-pruned model."""

import pytest
import torch
import torch.nn as nn
from sparsecomp.passes.sparsify import SparsifyError, allocation, engine

import sparsecomp as sc
from sparsecomp import models, patterns
from sparsecomp.errors import SparsecompError

from .test_methods import Tiny, calib


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def unchanged(m, before):
    return all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


class Deep(nn.Module):
    """Four Linears of different sizes and scales: allocations have something to tell apart."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(32, 64), nn.Linear(64, 24), nn.Linear(24, 48), nn.Linear(48, 16)
        with torch.no_grad():
            self.l2.weight[:, :4] *= 20  # a few outlier inputs

    def forward(self, x):
        return self.l4(torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))))


@pytest.mark.parametrize("method,how", [("wanda", "owl"), ("sparsegpt", "sensitivity"), ("magnitude", "owl")])
def test_allocation_keeps_the_global_budget_exact(method, how):
    m = Deep()
    _, res = sc.sparsify(m, method, 0.6, "unstructured", calib(2), allocation=how, return_report=True)
    ws = [mod.weight for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    total = sum(w.numel() for w in ws)
    zeros = sum(int((w == 0).sum()) for w in ws)
    assert zeros == round(0.6 * total)
    targets = {r.target for r in res.pruned}
    assert len(targets) > 1, "an allocation that gives every layer the same sparsity allocates nothing"
    assert any(how in n for n in res.notes)


def test_allocation_helpers():
    sizes = [100, 300, 37]
    counts = allocation.exact_counts([0.2, 0.9, 0.5], sizes, 0.7)
    assert sum(counts) == round(0.7 * sum(sizes)) and all(0 <= c <= 0.99 * n for c, n in zip(counts, sizes))
    fr = allocation.owl_sparsities([0.01, 0.05, 0.03], sizes, 0.5, 0.1)
    assert abs(sum(f * n for f, n in zip(fr, sizes)) / sum(sizes) - 0.5) < 1e-9
    assert fr[0] > fr[2] > fr[1]  # more outliers -> fewer zeros
    curves = [([0.3, 0.5, 0.7], [0.0, 0.01, 0.02]), ([0.3, 0.5, 0.7], [0.0, 0.2, 0.9])]
    fr = allocation.sensitivity_sparsities(curves, [100, 100], 0.5)
    assert fr[0] > 0.5 > fr[1] and abs(sum(fr) / 2 - 0.5) < 1e-9  # the insensitive layer takes the zeros


def test_skip_globs_and_default_heads():
    m = Tiny()
    _, res = sc.sparsify(m, "magnitude:unstructured:0.5", skip=["fc2"], return_report=True)
    assert patterns.density(m.fc2.weight) == 1.0 and patterns.density(m.fc1.weight) == 0.5
    assert patterns.density(m.head.weight) == 0.5  # skip= replaces the defaults
    m = Tiny()
    _, res = sc.sparsify(m, "magnitude:unstructured:0.5", return_report=True)
    assert {r.name: r.status for r in res.layers} == {"fc1": "pruned", "fc2": "pruned", "head": "skipped"}


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(30, 64)  # K = 30: not a multiple of 4
        self.b = nn.Linear(64, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_pattern_that_does_not_divide_skips_the_layer_with_a_reason():
    m = Odd()
    _, res = sc.sparsify(m, "sparsegpt:2:4", calibration=[torch.randn(8, 30)], return_report=True)
    by = {r.name: r for r in res.layers}
    assert by["a"].status == "skipped" and "divisible by 4" in by["a"].reason
    assert by["b"].status == "pruned" and patterns.nm_conformance(m.b.weight, 2, 4) == 1.0
    assert patterns.density(m.a.weight) == 1.0


def test_tied_head_is_skipped():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.mid = nn.Linear(16, 16)
            self.out = nn.Linear(16, 50, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(torch.relu(self.mid(self.emb(ids))))

    m = LM()
    _, res = sc.sparsify(m, "magnitude:unstructured:0.5", return_report=True)
    assert patterns.density(m.emb.weight) == 1.0
    assert {r.name: r.status for r in res.layers}["out"] == "skipped"


@pytest.mark.parametrize("call,needle", [
    (lambda m: sc.sparsify(m, "magnitude", 1.0), "[0, 1)"),
    (lambda m: sc.sparsify(m, "magnitude", -0.1), "[0, 1)"),
    (lambda m: sc.sparsify(m, "magnitude:unstructured:1.5"), "[0, 1)"),
    (lambda m: sc.sparsify(m, "magnitude", 0.3, "2:4"), "fixes the sparsity"),
    (lambda m: sc.sparsify(m, "obs", 0.5), "unknown sparsify method"),
    (lambda m: sc.sparsify(m, "wanda", 0.5), "needs calibration"),
    (lambda m: sc.sparsify(m, "sparsegpt", 0.5, calibration=[]), "needs calibration"),
    (lambda m: sc.sparsify(m, "sparsegpt", 0.5, calibration=torch.randn(4, 32)), "list of batches"),
    (lambda m: sc.sparsify(m, "sparsegpt", 0.5, calibration=[torch.randn(4, 32), torch.randn(4, 7)]), "batch 1"),
    (lambda m: sc.sparsify(m, "sparsegpt", 0.5, calibration=[torch.randn(4, 31)]), "does not run"),
    (lambda m: sc.sparsify(m, "wanda:2:4", calibration=calib(1), allocation="owl"), "N:M fixes"),
    (lambda m: sc.sparsify(m, "magnitude:2:4", skip=["*"]), "no layer"),
    (lambda m: sc.sparsify(m, "sparsegpt:2:4", calibration=calib(1), dampp=0.1), "dampp"),
])
def test_bad_input_is_one_clear_error_and_the_model_is_untouched(call, needle):
    m = Tiny()
    before = snapshot(m)
    with pytest.raises(SparsecompError) as e:
        call(m)
    assert needle in str(e.value)
    assert unchanged(m, before)


def test_no_linear_layer():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(SparsifyError, match="no Linear|no layer.*convolution"):  # as on the capture
        sc.sparsify(m, "magnitude:unstructured:0.5")
    with pytest.raises(SparsifyError, match="no Linear|no layer"):
        sc.sparsify(m, "wanda:unstructured:0.5", calibration=[torch.randn(1, 3, 8, 8)])


def test_singular_hessian_is_damped_never_nan():
    # Inputs living in a 3-dim subspace of 32 (rank-deficient), with dead (always zero) features,
    # and fewer tokens than features: H = X^T X is singular.
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 32, generator=g)
    basis[:, :5] = 0
    batches = [(torch.randn(4, 3, generator=g) @ basis,)]
    m = Tiny()
    _, res = sc.sparsify(m, "sparsegpt:unstructured:0.5", calibration=batches, damp=0.0, return_report=True)
    for name in ("fc1", "fc2"):
        w = getattr(m, name).weight
        assert torch.isfinite(w).all() and patterns.density(w) == 0.5
    notes = " ".join(n for r in res.layers for n in r.notes)
    assert "damped" in notes and "zero on all calibration tokens" in notes


def test_error_midway_leaves_the_model_unpruned(monkeypatch):
    calls = []
    real = engine._prune_layer

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if Ctrl-C came while the second layer was pruned
        return real(*a, **kw)

    monkeypatch.setattr(engine, "_prune_layer", flaky)
    m = Tiny()
    before = snapshot(m)
    with pytest.raises(KeyboardInterrupt):
        sc.sparsify(m, "sparsegpt:unstructured:0.5", calibration=calib(1))
    assert unchanged(m, before)
    monkeypatch.setattr(engine, "_prune_layer", real)
    sc.sparsify(m, "sparsegpt:unstructured:0.5", calibration=calib(1))  # a rerun starts from scratch and works
    assert patterns.density(m.fc1.weight) == 0.5


def test_padding_tokens_do_not_enter_the_statistics():
    model, _ = models.get("bert-tiny", layers=1)
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 6:] = 0
    ids2 = ids.clone()
    ids2[1, 6:] = 7  # different padding content, same real tokens
    results = []
    for batch_ids in (ids, ids2):
        m = __import__("copy").deepcopy(model)
        sc.sparsify(m, "wanda:unstructured:0.5", calibration=[{"input_ids": batch_ids, "attention_mask": mask}])
        results.append(m.encoder.layer[0].attention.self.query.weight.clone())
    assert torch.equal(results[0], results[1])


def test_sparsify_pass_in_a_pipeline_leaves_the_users_model_alone():
    model, cal = Tiny(), calib(2)
    before = snapshot(model)
    gm, ctx = sc.run_pipeline(model, cal[0], "sparsify-sparsegpt{pattern=2:4,refine=5},analyze-weights", calibration=cal)
    assert unchanged(model, before)
    res = ctx.results["sparsify-sparsegpt"]
    assert [r.name for r in res.pruned] == ["fc1", "fc2"]
    conf = {st.name: st.nm_conformance["2:4"] for st in ctx.results["analyze-weights"]}
    assert conf["fc1"] == conf["fc2"] == 1.0 and conf["head"] < 1.0
    assert torch.isfinite(gm(*cal[0])).all()
    node_meta = [n.meta["sparsecomp.sparsify"] for n in gm.graph.nodes if "sparsecomp.sparsify" in n.meta]
    assert [m["status"] for m in node_meta] == ["pruned", "pruned", "skipped"]


def test_x_at_w_parameters_are_pruned_in_their_stored_layout():
    class MatW(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w = nn.Parameter(torch.randn(32, 24))  # x @ w: stored [in, out]
            self.fc = nn.Linear(24, 8)

        def forward(self, x):
            return self.fc(torch.relu(x @ self.w))

    m = MatW()
    _, res = sc.sparsify(m, "sparsegpt:2:4", calibration=calib(2), return_report=True)
    assert [r.name for r in res.pruned] == ["w", "fc"]
    assert patterns.nm_conformance(m.w.t(), 2, 4) == 1.0  # groups of 4 along in_features
    assert patterns.nm_conformance(m.w, 2, 4) < 1.0


class Mixed(nn.Module):
    """Every kind of weight a capture lists: x @ W, F.linear(x, P), x @ Q.t(), attention, a conv, a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.W = nn.Parameter(torch.randn(16, 16))  # x @ W: stored [in, out]
        self.P = nn.Parameter(torch.randn(16, 16))
        self.Q = nn.Parameter(torch.randn(16, 16))
        self.pos = nn.Parameter(torch.randn(4, 16))  # 2-D, but no matmul weight
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        x = torch.nn.functional.linear((x + self.pos) @ self.W, self.P) @ self.Q.t()
        return self.fc(self.conv(self.mha(x, x, x)[0]))


def _layers(res):
    return {(r.name, r.status, r.reason) for r in res.layers}


def test_magnitude_without_data_finds_the_weights_the_capture_finds():
    # without calibration, magnitude looked at nn.Linear only: x @ W, F.linear and attention's
    # in_proj_weight stayed dense silently, and convolutions were not listed as skipped
    example = torch.randn(2, 4, 16)
    m = Mixed()
    _, res = sc.sparsify(m, "magnitude:2:4", return_report=True)
    _, ctx = sc.run_pipeline(Mixed(), example, "sparsify-magnitude{pattern=2:4}")
    assert _layers(res) == _layers(ctx.results["sparsify-magnitude"])
    assert {r.name for r in res.pruned} == {"W", "P", "Q", "mha.in_proj_weight", "mha.out_proj", "fc"}
    assert [r.name for r in res.skipped] == ["conv"] and "convolution" in res.skipped[0].reason
    # N:M groups run along in_features whatever the stored layout
    assert patterns.nm_conformance(m.W.t(), 2, 4) == patterns.nm_conformance(m.Q, 2, 4) == 1.0
    assert patterns.nm_conformance(m.mha.in_proj_weight, 2, 4) == 1.0 and patterns.density(m.pos) == 1.0
    # compile(sparsify=magnitude) prunes what its pipeline text's pass prunes
    cm = sc.compile(Mixed(), example, sparsify="magnitude:2:4", kernels="dense", max_seconds_per_layer=0.01)
    assert any("6 layers pruned" in n and "1 left dense" in n for n in cm.report.notes), cm.report.notes


def test_magnitude_without_data_names_a_weight_it_cannot_trace():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(8, 8))
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if x.dim() == 2:  # a branch on a Proxy: no symbolic trace (a capture sees a constant)
                x = x @ self.W
            return self.fc(x)

    m = Branchy()
    w = m.W.detach().clone()
    _, res = sc.sparsify(m, "magnitude", 0.5, return_report=True)
    by = {r.name: r for r in res.layers}
    assert by["fc"].status == "pruned" and by["W"].status == "skipped" and "calibration" in by["W"].reason
    assert torch.equal(m.W, w)
    sc.sparsify(m, "magnitude", 0.5, calibration=[torch.ones(2, 8)])  # with an input it is found
    assert patterns.density(m.W) == 0.5


def test_a_bare_linear_is_a_model():
    # the module's own weight: its name was "" and ".weight" raised a raw AttributeError
    m = nn.Linear(16, 8)
    _, res = sc.sparsify(m, "magnitude", 0.5, return_report=True)
    assert [r.name for r in res.pruned] == ["weight"] and patterns.density(m.weight) == 0.5
    _, ctx = sc.run_pipeline(nn.Linear(16, 8), torch.randn(2, 16), "sparsify-magnitude")
    assert [r.name for r in ctx.results["sparsify-magnitude"].pruned] == ["weight"]  # the capture's name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_a_parametrized_weight_is_refused_like_impose_does(method):
    # weight_norm recomputes the weight on every access: magnitude reported it pruned while
    # nothing stuck, Wanda / SparseGPT dropped it from the report
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    torch.nn.utils.parametrizations.weight_norm(m[0])
    before = snapshot(m)
    cal = [torch.randn(8, 32)]
    with pytest.raises(SparsifyError, match="layer '0' has a parametrized weight"):
        sc.sparsify(m, method, 0.5, calibration=cal)
    assert unchanged(m, before)
    _, res = sc.sparsify(m, method, 0.5, calibration=cal, skip=["0"], return_report=True)  # skipped: fine
    assert [r.name for r in res.pruned] == ["2"]


class Tied(nn.Module):
    def __init__(self, twice=False):
        super().__init__()
        torch.manual_seed(0)
        self.twice = twice
        self.a = nn.Linear(32, 32)
        if not twice:
            self.b = nn.Linear(32, 32)
            self.b.weight = self.a.weight
        self.c = nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.a(h) if self.twice else self.b(h)))


@pytest.mark.parametrize("twice", [False, True])
@pytest.mark.parametrize("how", [dict(), dict(calibration=calib(1)), dict(calibration=calib(1), allocation="owl")])
def test_a_shared_weight_is_one_pruned_entry_and_one_skipped(twice, how):
    # the report listed the shared weight twice under the second name and counted it twice
    m = Tied(twice)
    _, res = sc.sparsify(m, "magnitude", 0.5, **how, return_report=True)
    if twice and not how:  # seen on the module alone, a layer called twice is one layer
        assert [(r.name, r.status) for r in res.layers] == [("a", "pruned"), ("c", "pruned")]
    else:
        second = "a" if twice else "b"
        reason = "called again" if twice else "shares its weight with a"
        assert [(r.name, r.status) for r in res.layers] == [("a", "pruned"), (second, "skipped"), ("c", "pruned")]
        assert reason in res.layers[1].reason
    zeros = int((m.a.weight == 0).sum() + (m.c.weight == 0).sum())
    assert res.sparsity == zeros / (32 * 32 + 32 * 8) == 0.5


def test_a_layer_called_twice_in_a_pipeline_marks_each_call():
    gm, ctx = sc.run_pipeline(Tied(twice=True), torch.randn(4, 32), "sparsify-magnitude")
    marks = [n.meta["sparsecomp.sparsify"]["status"] for n in gm.graph.nodes if "sparsecomp.sparsify" in n.meta]
    assert marks == ["pruned", "skipped", "pruned"]


def test_owl_above_what_it_can_reach_says_so():
    m = Deep()
    _, res = sc.sparsify(m, "magnitude", 0.995, calibration=calib(1), allocation="owl", return_report=True)
    assert res.sparsity < 0.995
    assert any("cannot be met exactly" in n for n in res.notes), res.notes
    _, res = sc.sparsify(Deep(), "magnitude", 0.6, calibration=calib(1), allocation="owl", return_report=True)
    assert not any("cannot be met" in n for n in res.notes)


@pytest.mark.parametrize("make,call,needle", [
    (lambda: nn.Linear(4, 4, device="meta"), lambda m: sc.sparsify(m, "magnitude", 0.5), "meta device"),
    (lambda: nn.Sequential(nn.Linear(32, 4, device="meta")), lambda m: sc.sparsify(m, "wanda", 0.5, calibration=calib(1)), "meta device"),
    (lambda: nn.Sequential(nn.LazyLinear(4)), lambda m: sc.sparsify(m, "magnitude", 0.5), "uninitialized (lazy)"),
    (Tiny, lambda m: sc.sparsify(m, "sparsegpt", 0.5, calibration=calib(1), blocksize=64.5), "blocksize must be an integer"),
    (Tiny, lambda m: sc.sparsify(m, "sparsegpt", 0.5, calibration=calib(1), refine=2.5), "refine must be an integer"),
    (Tiny, lambda m: sc.sparsify(m, "sparsegpt", 0.5, calibration=calib(1), damp="0.1"), "damp must be a number"),
    (Tiny, lambda m: sc.sparsify(m, "sparsegpt", 0.5, calibration=calib(1), correct="yes"), "correct must be a bool"),
    (Tiny, lambda m: sc.sparsify(m, "magnitude", 0.5, skip=3), "skip must be a layer-name glob"),
    (Tiny, lambda m: sc.sparsify(m, "magnitude", 0.5, skip=["fc1", None]), "skip must be a layer-name glob"),
])
def test_unusable_weights_and_option_types_are_one_clear_error(make, call, needle):
    m = make()
    with pytest.raises(SparsecompError) as e:
        call(m)
    assert needle in str(e.value) and "\n" not in str(e.value)
