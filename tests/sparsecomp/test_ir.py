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
