"""IR helpers: the output comparison every verification uses, and input normalisation."""

import pytest
import torch

from sparsecomp.ir import compare_outputs, normalize_inputs


def test_tolerance_is_relative_to_the_largest_output():
    ref = torch.tensor([100.0, 1.0])
    assert compare_outputs(ref + 0.009, ref)[0]  # 0.009 <= 1e-4 x 100
    ok, err, allowed = compare_outputs(ref + torch.tensor([0.0, 0.02]), ref)
    assert not ok and err == pytest.approx(0.02) and allowed == pytest.approx(0.01)


def test_non_finite_values_must_match_exactly():
    ref = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    assert compare_outputs(ref.clone(), ref)[0]
    assert not compare_outputs(torch.tensor([0.0, float("inf"), -float("inf"), 1.0]), ref)[0]  # NaN lost
    assert not compare_outputs(torch.tensor([float("nan"), float("inf"), float("inf"), 1.0]), ref)[0]  # sign of inf
    assert not compare_outputs(torch.tensor([float("nan"), float("inf"), -float("inf"), float("inf")]), ref)[0]


def test_structure_must_match():
    a = (torch.ones(2), {"x": torch.zeros(3)})
    assert compare_outputs(a, (torch.ones(2), {"x": torch.zeros(3)}))[0]
    assert not compare_outputs(a, (torch.ones(2),))[0]
    assert not compare_outputs(torch.ones(2, 1), torch.ones(2))[0]


def test_normalize_inputs():
    t = torch.ones(1)
    assert normalize_inputs(t) == ((t,), {})
    assert normalize_inputs([t, t])[0] == (t, t)
    assert normalize_inputs({"a": t}) == ((), {"a": t})
    assert normalize_inputs(((t,), {"b": t})) == ((t,), {"b": t})
    with pytest.raises(TypeError, match="example inputs must be"):
        normalize_inputs(3)


def test_output_cosine_judges_direction_and_refuses_mismatches():
    import torch

    from sparsecomp.ir import output_cosine

    r = torch.randn(4, 8)
    assert output_cosine((r * 1.0001,), (r,)) > 0.9999
    assert output_cosine(r, -r) < -0.99  # opposite direction must NOT pass
    assert output_cosine(r, r[:2]) == 0.0  # shapes differ
    bad = r.clone()
    bad[0, 0] = float("nan")
    assert output_cosine(bad, r) == 0.0


class _TwoIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x, y):
        return self.lin(x) + y


class _DictOut(torch.nn.Module):
    def forward(self, x):
        return {"double": x * 2}


def test_plain_call_convention_drops_pytree_only_where_the_signature_is_plain():
    from sparsecomp.frontend import capture
    from sparsecomp.ir import plain_call_convention

    torch.manual_seed(0)
    m = _TwoIn().eval()
    x, y = torch.randn(3, 8), torch.randn(3, 4)
    gm = capture(m, (x, y))
    assert "tree_flatten_spec" in gm.code and plain_call_convention(gm)
    assert "tree_flatten_spec" not in gm.code and "tree_unflatten" not in gm.code
    with torch.no_grad():
        want = m(x, y)
        assert torch.equal(gm(x, y), want)  # a tensor, not a 1-tuple
        xb, yb = torch.randn(5, 8), torch.randn(5, 4)
        assert torch.equal(gm(xb, yb), m(xb, yb))  # a dynamic batch still works
    with pytest.raises(AssertionError, match="Guard failed"):
        gm(torch.randn(3, 9), y)  # the shape guards still run
    # keyword example inputs and a dict output keep the exported convention
    kw = capture(m, {"x": x, "y": y})
    assert not plain_call_convention(kw) and "tree_flatten_spec" in kw.code
    d = capture(_DictOut(), (x,))
    assert not plain_call_convention(d)
    with torch.no_grad():
        assert torch.equal(d(x)["double"], x * 2)
