"""The three methods on small models with known answers, and the patterns they must meet exactly."""

import pytest
import torch
import torch.nn as nn
from sparsecomp.passes.sparsify import SparsifyConfig, masks, solvers

import sparsecomp as sc
from sparsecomp import patterns


class Tiny(nn.Module):
    """Two Linears with correlated inputs (so the Hessian matters) and an output head."""

    def __init__(self, d_in=32, hidden=48, d_out=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.head = nn.Linear(d_out, 4)

    def forward(self, x):
        return self.head(self.fc2(torch.relu(self.fc1(x))))


def calib(n=4, d_in=32, tokens=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g)  # correlated features, very different scales
    scale = torch.logspace(-1, 1, d_in)
    return [((torch.randn(tokens, d_in, generator=g) @ mix) * scale,) for _ in range(n)]


def weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_magnitude_zeroes_exactly_the_smallest():
    m = Tiny()
    w = m.fc1.weight.detach().clone()
    sc.sparsify(m, "magnitude", 0.3, "unstructured")
    k = round(0.3 * w.numel())
    smallest = torch.sort(w.abs().flatten(), stable=True).indices[:k]
    expect = torch.ones(w.numel(), dtype=torch.bool)
    expect[smallest] = False
    assert torch.equal(m.fc1.weight.flatten() != 0, expect)
    assert torch.equal(m.fc1.weight.flatten()[expect], w.flatten()[expect])  # kept values untouched
    # the same rule as `impose` (ties to the lower index), for every pattern
    for spec in ("unstructured:0.7", "2:4", "block:4x4:0.5"):
        m2 = Tiny()
        ref = patterns.impose_pattern(m2.fc2.weight.detach(), spec)
        sc.sparsify(m2, f"magnitude:{spec}")
        assert torch.equal(m2.fc2.weight, ref), spec


def _input_norms(m, batches):
    acts = []
    h = m.fc2.register_forward_hook(lambda mod, inp, out: acts.append(inp[0].reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        for (x,) in batches:
            m(x)
    h.remove()
    return torch.cat(acts).norm(dim=0)


def test_wanda_mask_equals_brute_force():
    batches = calib()
    m = Tiny()
    dense = weights(m)
    sc.sparsify(m, "wanda", 0.5, "unstructured", batches, skip=["head", "fc1"])
    # brute force: fc2's input norms on the (here unpruned) model, per output row the k smallest scores
    ref = Tiny()
    norms = _input_norms(ref, batches)
    w = dense["fc2.weight"]
    k_row = w.shape[1] // 2
    for r in range(w.shape[0]):
        score = [(abs(float(w[r, j])) * float(norms[j]), j) for j in range(w.shape[1])]
        zeroed = {j for _, j in sorted(score)[:k_row]}
        got = {j for j in range(w.shape[1]) if m.fc2.weight[r, j] == 0}
        assert got == zeroed, f"row {r}"
    assert torch.equal(m.fc1.weight, dense["fc1.weight"])


def test_wanda_sees_the_pruned_model_layer_by_layer():
    batches = calib()
    m = Tiny()
    sc.sparsify(m, "wanda", 0.5, "unstructured", batches, skip=["head"])
    # fc2 was ranked with the input norms of the model whose fc1 was already pruned
    pruned_fc1 = Tiny()
    pruned_fc1.fc1.weight.data = m.fc1.weight.data.clone()
    norms = _input_norms(pruned_fc1, batches)
    mask = masks.select_mask(Tiny().fc2.weight.detach().abs() * norms[None, :], patterns.parse_pattern("unstructured:0.5"),
                             per_row=True)
    assert torch.equal(m.fc2.weight == 0, mask)


def layer_error(w_new, w_old, batches, layer="fc2", model=None):
    model = model or Tiny()
    acts = []
    mod = getattr(model, layer)
    h = mod.register_forward_hook(lambda m, inp, out: acts.append(inp[0]))
    with torch.no_grad():
        for (x,) in batches:
            model(x)
    h.remove()
    X = torch.cat(acts)
    return float(((X @ w_new.t() - X @ w_old.t()) ** 2).sum().detach())


@pytest.mark.parametrize("spec", ["unstructured:0.5", "2:4", "unstructured:0.8", "block:4x2:0.5"])
def test_sparsegpt_beats_magnitude_and_wanda_on_layer_error(spec):
    batches = calib()
    dense = Tiny().fc2.weight.detach().clone()
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = Tiny()
        sc.sparsify(m, f"{method}:{spec}", calibration=batches, skip=["head", "fc1"])
        assert torch.count_nonzero(m.fc2.weight) == torch.count_nonzero(patterns.impose_pattern(dense, spec))  # same budget
        errs[method] = layer_error(m.fc2.weight, dense, batches)
    assert errs["sparsegpt"] < 0.7 * min(errs["wanda"], errs["magnitude"]), errs


def test_refine_and_corrections_never_increase_the_layer_error():
    batches = calib()
    dense = Tiny().fc2.weight.detach().clone()
    m0, m1 = Tiny(), Tiny()
    sc.sparsify(m0, "sparsegpt:unstructured:0.6", calibration=batches, skip=["head", "fc1"])
    sc.sparsify(m1, "sparsegpt:unstructured:0.6", calibration=batches, skip=["head", "fc1"], refine=50)
    assert torch.equal(m0.fc2.weight == 0, m1.fc2.weight == 0)  # same mask, better values
    assert layer_error(m1.fc2.weight, dense, batches) <= layer_error(m0.fc2.weight, dense, batches) * (1 + 1e-6)


def test_masked_lstsq_reaches_the_exact_optimum():
    torch.manual_seed(0)
    X = torch.randn(200, 12)
    H = (X.t() @ X / 200).double()
    T = torch.randn(3, 12)
    keep = torch.rand(3, 12) > 0.5
    V = solvers.masked_lstsq(T * keep, T, H, keep, iters=40)
    for r in range(3):
        idx = keep[r].nonzero().flatten()
        exact = torch.linalg.solve(H[idx][:, idx], (H @ T[r].double())[idx])
        assert torch.allclose(V[r, idx].double(), exact, atol=1e-4)
        assert (V[r, ~keep[r]] == 0).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("spec,check", [
    ("2:4", lambda w: patterns.nm_conformance(w, 2, 4) == 1.0 and patterns.density(w) == 0.5),
    ("4:8", lambda w: patterns.nm_conformance(w, 4, 8) == 1.0 and patterns.density(w) == 0.5),
    ("block:4x4:0.75", lambda w: abs(patterns.block_occupancy(w, 4, 4) - 0.25) < 1e-12),
    ("block:16x1:0.5", lambda w: abs(patterns.block_occupancy(w, 16, 1) - 0.5) < 1e-12),
    ("unstructured:0.37", lambda w: torch.count_nonzero(w) == w.numel() - round(0.37 * w.numel())),
])
def test_patterns_are_met_exactly(method, spec, check):
    m = Tiny()
    _, res = sc.sparsify(m, f"{method}:{spec}", calibration=calib(2), return_report=True)
    for name in ("fc1", "fc2"):
        w = getattr(m, name).weight
        assert check(w), (name, spec)
        assert torch.isfinite(w).all()
    assert torch.equal(m.head.weight, Tiny().head.weight)  # the output head is skipped by default
    assert [r.name for r in res.skipped] == ["head"] and "skipped by" in res.skipped[0].reason


def test_select_mask_quota_helpers():
    assert masks.split_quota(10, [3, 3, 4]) == [3, 3, 4]
    assert sum(masks.split_quota(7, [5, 5, 5])) == 7
    assert masks.split_quota(5, [1, 100]) == [0, 5]
    p = patterns.parse_pattern("unstructured:0.5")
    z = masks.select_mask(torch.arange(12.0).view(3, 4), p, 5, per_row=True)
    assert z.sum(1).tolist() == [2, 2, 1]  # quota split over rows by largest remainder, exact total
    nan = torch.tensor([[float("nan"), 0.1, 0.2, 0.3]])
    assert not masks.select_mask(nan, p, 3)[0, 0]  # NaN ranks last, never silently removed


def test_config_spelling_round_trips():
    from sparsecomp.passes.sparsify import parse_sparsify_spec

    for spec in ("sparsegpt:unstructured:0.5", "wanda:2:4", "magnitude:block:16x1:0.9"):
        assert str(parse_sparsify_spec(spec)) == spec
    cfg = parse_sparsify_spec("sparsegpt:2:4", refine=10)
    assert cfg.describe() == "sparsegpt:2:4{refine=10}"
    assert isinstance(sc.SparsifyConfig(), SparsifyConfig)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("where", ["columns", "rows"])
def test_zeros_already_in_a_layer_count_toward_its_exact_count(method, where):
    # 30% zeros packed in the first lazy block (columns) or in a few output rows (Wanda's groups):
    # an equal share per block / row kept the surplus zeros on top of the asked count
    m = nn.Sequential(nn.Linear(256, 64))
    with torch.no_grad():
        if where == "columns":
            m[0].weight[:, :77] = 0
        else:
            m[0].weight[:20] = 0
    g = torch.Generator().manual_seed(0)
    _, res = sc.sparsify(m, method, 0.5, calibration=[(torch.randn(64, 256, generator=g),) for _ in range(2)],
                         return_report=True)
    assert int((m[0].weight == 0).sum()) == 8192
    assert res.layers[0].sparsity == 0.5


def test_split_quota_with_floors():
    assert masks.split_quota(10, [10, 10], [0, 0]) == masks.split_quota(10, [10, 10]) == [5, 5]
    assert masks.split_quota(10, [10, 10], [8, 0]) == [8, 2]  # a chunk's own zeros come first
    assert masks.split_quota(12, [10, 10, 10], [6, 0, 0]) == [6, 3, 3]
    assert masks.split_quota(5, [10, 10], [4, 3]) == [4, 3]  # floors above the total: the floors


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_float64_models_keep_their_precision(method):
    # kept weights went through float32 (every one of them changed for magnitude)
    m = Tiny().double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # float64 values (a float32 init cast up would survive a float32 round trip)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=g) / p.shape[-1] ** 0.5)
    dense = {k: v.clone() for k, v in m.state_dict().items()}
    batches = [(x.double(),) for (x,) in calib(2)]
    sc.sparsify(m, method, 0.5, calibration=batches)
    for name in ("fc1", "fc2"):
        w, w0 = getattr(m, name).weight, dense[f"{name}.weight"]
        assert w.dtype == torch.float64 and patterns.density(w) == 0.5
        kept = w != 0
        if method == "sparsegpt":  # new values, computed in float64: not float32 numbers
            assert (w[kept] != w[kept].float().double()).float().mean() > 0.9
        else:  # only zeroed: every kept weight bit-identical
            assert torch.equal(w[kept], w0[kept])


def test_wanda_breaks_ties_on_dead_inputs_by_magnitude():
    # all-zero calibration inputs give every weight the score 0: the index broke the ties, zeroing
    # whole leading input columns, silently
    m = Tiny()
    w = m.fc1.weight.detach().clone()
    _, res = sc.sparsify(m, "wanda", 0.5, calibration=[(torch.zeros(8, 32),)], skip=["head", "fc2"], return_report=True)
    expect = masks.select_mask(w.abs(), patterns.parse_pattern("unstructured:0.5"), per_row=True)
    assert torch.equal(m.fc1.weight == 0, expect)  # per row, the smallest |w|
    assert "32 inputs were zero on all calibration tokens" in " ".join(res.layers[0].notes)
    # a few dead inputs among live ones: their weights go first, the live ones keep Wanda's order
    batches = calib(2)
    for (x,) in batches:
        x[:, :3] = 0
    m = Tiny()
    sc.sparsify(m, "wanda", 0.5, calibration=batches, skip=["head", "fc2"])
    assert (m.fc1.weight[:, :3] == 0).all()


def test_every_method_reports_its_output_error_with_data():
    # Wanda's error was always None, magnitude's too even with calibration data
    batches = calib(2)
    dense = Tiny().fc2.weight.detach().clone()
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = Tiny()
        _, res = sc.sparsify(m, method, 0.5, calibration=batches, skip=["head", "fc1"], return_report=True)
        err = res.pruned[0].error
        X = torch.cat([torch.relu(Tiny().fc1(x)) for (x,) in batches]).detach()
        D = m.fc2.weight.detach() - dense
        ref = float(((X @ D.t()) ** 2).sum() / ((X @ dense.t()) ** 2).sum())
        assert err is not None and abs(err - ref) < 1e-4 * ref, (method, err, ref)
    _, res = sc.sparsify(Tiny(), "magnitude", 0.5, return_report=True)
    assert all(r.error is None for r in res.pruned)  # nothing to measure on


def test_sparsegpt_with_fewer_tokens_than_inputs_says_so():
    """8 tokens for 32 inputs: the fit holds on those tokens only (the reviewer measured 0.36 against
    magnitude's 0.20 on held-out data while the layer reported error 0.0); the report says why."""
    few, enough = Tiny(), Tiny()
    _, res = sc.sparsify(few, "sparsegpt", 0.5, calibration=calib(1, tokens=8), skip=["head", "fc2"], return_report=True)
    assert "calibrated on 8 tokens for 32 inputs" in " ".join(res.layers[0].notes)
    _, res = sc.sparsify(enough, "sparsegpt", 0.5, calibration=calib(4, tokens=16), skip=["head", "fc2"], return_report=True)
    assert not any("tokens for" in n for n in res.layers[0].notes)


def test_method_names_are_case_insensitive_in_either_spelling():
    assert SparsifyConfig(method="SparseGPT", pattern=patterns.parse_pattern("2:4")).method == "sparsegpt"
    from sparsecomp.passes.sparsify import parse_sparsify_spec

    assert parse_sparsify_spec("SparseGPT:2:4").method == "sparsegpt"
