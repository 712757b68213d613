"""Weight-pattern spellings, imposing, and measurements (sparsecomp/patterns.py)."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsecomp.errors import PatternError, SparsecompError
from sparsecomp.patterns import (
    WeightPattern,
    block_occupancy,
    density,
    imposable_layers,
    impose,
    impose_pattern,
    nm_conformance,
    parse_pattern,
    zero_cols,
    zero_rows,
)

SETTINGS = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------------------------------------
# spelling


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("unstructured:0.9", WeightPattern("unstructured", sparsity=0.9)),
        ("unstructured:0", WeightPattern("unstructured", sparsity=0.0)),
        ("block:16x1:0.9", WeightPattern("block", sparsity=0.9, block=(16, 1))),
        ("block:4X8:0.5", WeightPattern("block", sparsity=0.5, block=(4, 8))),
        ("2:4", WeightPattern("nm", n=2, m=4)),
        (" 4:8 ", WeightPattern("nm", n=4, m=8)),
    ],
)
def test_parse_known_spellings(spec, expected):
    assert parse_pattern(spec) == expected


@pytest.mark.parametrize(
    "pattern, text",
    [
        (WeightPattern("unstructured", sparsity=0.9), "unstructured:0.9"),
        (WeightPattern("block", sparsity=0.5, block=(16, 1)), "block:16x1:0.5"),
        (WeightPattern("nm", n=2, m=4), "2:4"),
    ],
)
def test_str_is_canonical_spelling(pattern, text):
    assert str(pattern) == text
    assert str(parse_pattern("block:16X1:0.50")) == "block:16x1:0.5"


patterns_st = st.one_of(
    st.builds(
        lambda s: WeightPattern("unstructured", sparsity=s),
        st.floats(0, 1, exclude_max=True, allow_nan=False),
    ),
    st.builds(
        lambda r, c, s: WeightPattern("block", sparsity=s, block=(r, c)),
        st.integers(1, 512),
        st.integers(1, 512),
        st.floats(0, 1, exclude_max=True, allow_nan=False),
    ),
    st.integers(2, 64).flatmap(lambda m: st.builds(lambda n: WeightPattern("nm", n=n, m=m), st.integers(1, m - 1))),
)


@SETTINGS
@given(patterns_st)
def test_parse_str_round_trip(p):
    assert parse_pattern(str(p)) == p
    assert parse_pattern(p) is p


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "unstructured",
        "unstructured:1.0",
        "unstructured:1",
        "unstructured:-0.1",
        "unstructured:abc",
        "block:16:0.5",
        "block:16x1",
        "block:0x4:0.5",
        "block:16x1:1.5",
        "4:2",
        "0:4",
        "2:2",
        "2:4:0.5",
        "dense",
    ],
)
def test_bad_spec_names_spec_and_lists_spellings(spec):
    with pytest.raises(PatternError) as ei:
        parse_pattern(spec)
    err = ei.value
    assert repr(spec) in err.message
    assert "unstructured:S" in err.hint and "block:RxC:S" in err.hint and "2:4" in err.hint


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="unstructured", sparsity=1.0),
        dict(kind="unstructured", sparsity=float("nan")),
        dict(kind="unstructured"),
        dict(kind="block", sparsity=0.5),
        dict(kind="block", sparsity=0.5, block=(0, 1)),
        dict(kind="nm", n=4, m=4),
        dict(kind="nm", n=2, m=4, sparsity=0.5),
        dict(kind="triangular", sparsity=0.5),
    ],
)
def test_invalid_weightpattern_construction(kwargs):
    with pytest.raises(PatternError):
        WeightPattern(**kwargs)


def test_parse_rejects_non_string():
    with pytest.raises(PatternError):
        parse_pattern(0.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# impose_pattern


def _dense(rows, cols, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(dtype)


@SETTINGS
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    s=st.floats(0, 1, exclude_max=True, allow_nan=False),
    seed=st.integers(0, 2**16),
)
def test_unstructured_exact_count_and_smallest(rows, cols, s, seed):
    w = _dense(rows, cols, seed)
    before = w.clone()
    out = impose_pattern(w, WeightPattern("unstructured", sparsity=s))
    assert torch.equal(w, before), "input must not be modified"
    assert out.shape == w.shape and out.dtype == w.dtype
    k = round(s * w.numel())
    zeroed = out == 0
    assert int(zeroed.sum()) == k
    # every kept entry is unchanged and at least as large as every zeroed one
    assert torch.equal(out[~zeroed], w[~zeroed])
    if 0 < k < w.numel():
        assert w[zeroed].abs().max() <= w[~zeroed].abs().min()


def test_unstructured_ties_go_to_lower_index():
    w = torch.ones(2, 5)
    out = impose_pattern(w, "unstructured:0.5")
    assert torch.equal(out.reshape(-1) == 0, torch.tensor([True] * 5 + [False] * 5))


def test_unstructured_counts_existing_zeros_and_is_idempotent():
    w = _dense(16, 16)
    w[:4] = 0  # 25% already zero
    out = impose_pattern(w, "unstructured:0.5")
    assert int((out == 0).sum()) == 128
    assert torch.equal(impose_pattern(out, "unstructured:0.5"), out)


def test_unstructured_exact_on_large_and_property():
    w = _dense(96, 200)
    out = impose_pattern(w, "unstructured:0.9")
    assert abs(density(out) - 0.1) <= 1 / w.numel()


def test_nan_ranks_as_largest():
    w = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])
    out = impose_pattern(w, "unstructured:0.75")
    assert torch.isnan(out[0, 0]) and torch.equal(out[0, 1:], torch.zeros(3))
    out = impose_pattern(torch.tensor([[0.1, float("nan"), 5.0, 0.2]]), "2:4")
    assert torch.isnan(out[0, 1]) and out[0, 2] == 5.0 and out[0, 0] == 0 and out[0, 3] == 0
    blk = torch.tensor([[float("nan"), 0.1], [9.0, 9.0]])
    out = impose_pattern(blk, "block:1x2:0.5")
    assert torch.isnan(out[0, 0]) and torch.equal(out[1], torch.zeros(2))


def _brute_block_zero_tiles(w, r, c, s):
    """Reference: tiles sorted by (L1 norm, tile index), first round(s*n) zeroed."""
    rows, cols = w.shape
    rb, cb = -(-rows // r), -(-cols // c)
    norms = []
    for i in range(rb):
        for j in range(cb):
            norms.append((float(w[i * r : i * r + r, j * c : j * c + c].abs().sum()), i * cb + j))
    k = round(s * len(norms))
    return {idx for _, idx in sorted(norms)[:k]}, rb, cb


@SETTINGS
@given(
    rows=st.integers(1, 30),
    cols=st.integers(1, 30),
    r=st.integers(1, 8),
    c=st.integers(1, 8),
    s=st.floats(0, 1, exclude_max=True, allow_nan=False),
    seed=st.integers(0, 2**16),
)
def test_block_zeroes_smallest_l1_tiles(rows, cols, r, c, s, seed):
    w = _dense(rows, cols, seed)
    out = impose_pattern(w, WeightPattern("block", sparsity=s, block=(r, c)))
    expect, rb, cb = _brute_block_zero_tiles(w, r, c, s)
    for i in range(rb):
        for j in range(cb):
            tile = out[i * r : i * r + r, j * c : j * c + c]
            if i * cb + j in expect:
                assert not tile.any()
            else:
                assert torch.equal(tile, w[i * r : i * r + r, j * c : j * c + c])
    n_blocks = rb * cb
    assert abs(block_occupancy(out, r, c) - (1 - s)) <= 1 / n_blocks + 1e-12


def test_block_orientation_r_along_rows():
    # 4x2 weight: column 0 of rows 0-1 is small
    w = torch.tensor([[1.0, 100.0], [1.0, 100.0], [100.0, 100.0], [100.0, 100.0]])
    out = impose_pattern(w, "block:2x1:0.25")  # 4 tiles, one zeroed: rows 0-1 of column 0
    assert torch.equal(out == 0, torch.tensor([[True, False], [True, False], [False, False], [False, False]]))
    out = impose_pattern(w, "block:1x2:0.25")  # tiles are rows: row 0 (tie with row 1, lower wins)
    assert torch.equal(out == 0, torch.tensor([[True, True], [False, False], [False, False], [False, False]]))


def test_block_16x1_property():
    w = _dense(128, 96)
    out = impose_pattern(w, "block:16x1:0.9")
    n_blocks = (128 // 16) * 96
    assert abs(block_occupancy(out, 16, 1) - 0.1) <= 1 / n_blocks


@SETTINGS
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 40),
    m=st.integers(2, 9),
    data=st.data(),
)
def test_nm_keeps_n_largest_per_group(rows, cols, m, data):
    n = data.draw(st.integers(1, m - 1))
    seed = data.draw(st.integers(0, 2**16))
    w = _dense(rows, cols, seed)
    out = impose_pattern(w, WeightPattern("nm", n=n, m=m))
    assert nm_conformance(out, n, m) == 1.0
    for g0 in range(0, cols, m):
        grp_w, grp_o = w[:, g0 : g0 + m], out[:, g0 : g0 + m]
        kept = grp_o != 0
        # random normal entries are nonzero, so exactly min(n, len) survive per group
        assert torch.all(kept.sum(dim=1) == min(n, grp_w.shape[1]))
        assert torch.equal(grp_o[kept], grp_w[kept])
        for i in range(rows):
            if kept[i].all() or not kept[i].any():
                continue
            assert grp_w[i][~kept[i]].abs().max() <= grp_w[i][kept[i]].abs().min()


def test_nm_groups_run_along_in_features():
    row = torch.arange(1.0, 9.0).unsqueeze(0)  # [1, 8]
    assert torch.equal(impose_pattern(row, "2:4"), torch.tensor([[0, 0, 3, 4, 0, 0, 7, 8.0]]))
    col = torch.arange(1.0, 9.0).unsqueeze(1)  # [8, 1]: every group is a 1-long tail, all kept
    assert torch.equal(impose_pattern(col, "2:4"), col)
    tail = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])  # tail group of 3 keeps 2
    assert torch.equal(impose_pattern(tail, "2:4"), torch.tensor([[0, 0, 3, 4, 0, 6, 7.0]]))


def test_nm_ties_keep_lower_index():
    assert torch.equal(impose_pattern(torch.ones(1, 4), "2:4"), torch.tensor([[1, 1, 0, 0.0]]))


def test_conv_weight_uses_2d_view():
    conv_w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    out = impose_pattern(conv_w, "2:4")
    assert out.shape == conv_w.shape
    assert nm_conformance(out, 2, 4) == 1.0
    view = out.reshape(8, 27)
    assert torch.equal(view, impose_pattern(conv_w.reshape(8, 27), "2:4"))
    out = impose_pattern(conv_w, "unstructured:0.5")
    assert int((out == 0).sum()) == round(0.5 * conv_w.numel())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("spec", ["unstructured:0.7", "block:4x2:0.5", "4:8"])
def test_impose_keeps_dtype(dtype, spec):
    w = _dense(12, 20, dtype=dtype)
    out = impose_pattern(w, spec)
    assert out.dtype == dtype and out.shape == w.shape
    kept = out != 0
    assert torch.equal(out[kept], w[kept])


def test_impose_pattern_rejects_1d():
    with pytest.raises(PatternError):
        impose_pattern(torch.randn(5), "2:4")


# ---------------------------------------------------------------------------------------------
# impose on a model


class MyLinear(nn.Linear):
    pass


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.norm = nn.LayerNorm(16)
        self.encoder = nn.ModuleList(
            [nn.ModuleDict({"fc1": nn.Linear(16, 32), "fc2": MyLinear(32, 16)}) for _ in range(2)]
        )
        self.conv1 = nn.Conv1d(4, 8, 3)
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.head = nn.Linear(16, 4)


def test_impose_all_layers_in_place():
    torch.manual_seed(0)
    net = Net()
    emb, norm = net.emb.weight.detach().clone(), net.norm.weight.detach().clone()
    fc1_param = net.encoder[0]["fc1"].weight
    names = impose(net, "2:4")
    assert names == [
        "encoder.0.fc1",
        "encoder.0.fc2",
        "encoder.1.fc1",
        "encoder.1.fc2",
        "conv1",
        "conv2",
        "head",
    ]
    assert names == imposable_layers(net)
    for name in names:
        w = net.get_submodule(name).weight
        assert nm_conformance(w, 2, 4) == 1.0
        assert isinstance(w, nn.Parameter) and w.requires_grad
    assert net.encoder[0]["fc1"].weight is fc1_param  # same Parameter object: in place
    assert torch.equal(net.emb.weight, emb) and torch.equal(net.norm.weight, norm)


def test_impose_glob_selects_layers():
    torch.manual_seed(0)
    net = Net()
    head = net.head.weight.detach().clone()
    names = impose(net, parse_pattern("unstructured:0.5"), layers="encoder.*.fc1")
    assert names == ["encoder.0.fc1", "encoder.1.fc1"]
    for name in names:
        assert density(net.get_submodule(name).weight) == 0.5
    assert density(net.encoder[0]["fc2"].weight) == 1.0
    assert torch.equal(net.head.weight, head)


def test_impose_glob_without_match_lists_layers():
    with pytest.raises(PatternError) as ei:
        impose(Net(), "2:4", layers="decoder.*")
    assert "'decoder.*'" in ei.value.message
    assert "encoder.0.fc1" in ei.value.hint and "head" in ei.value.hint


def test_impose_many_layers_hint_is_short():
    net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(25)])
    with pytest.raises(PatternError) as ei:
        impose(net, "2:4", layers="nope")
    assert "25 in all" in ei.value.hint and "24" not in ei.value.hint.split("...")[0]


def test_impose_model_without_layers():
    with pytest.raises(PatternError):
        impose(nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4)), "2:4")


def test_impose_bad_spec_is_pattern_error():
    with pytest.raises(SparsecompError):
        impose(Net(), "3:3")


# ---------------------------------------------------------------------------------------------
# measurements


def test_measurements_small_examples():
    w = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 2.0, 0.0, 0.0],
            [0.0, 0.0, float("nan"), 3.0, 0.0],
        ]
    )
    assert density(w) == 4 / 15
    assert zero_rows(w) == 1
    assert zero_cols(w) == 2  # columns 1 and 4
    # 2x2 tiles over a 4x6 padded grid: (0,0) yes, (0,1) yes, (0,2) no, (1,0) no, (1,1) yes, (1,2) no
    assert block_occupancy(w, 2, 2) == 3 / 6
    assert block_occupancy(w, 1, 1) == density(w)
    # groups of 4 (tail of 1): row1 [1,0,2,0] has 2, row2 [0,0,nan,3] has 2 -> all conform to 2:4
    assert nm_conformance(w, 2, 4) == 1.0
    assert nm_conformance(w, 1, 4) == 4 / 6


def test_measurements_conv_view_and_edges():
    conv_w = torch.zeros(4, 2, 3, 3)
    conv_w[1, 0, 0, 0] = 1.0
    assert zero_rows(conv_w) == 3
    assert zero_cols(conv_w) == 17
    assert density(torch.zeros(0, 3)) == 0.0
    assert nm_conformance(torch.ones(3, 3), 2, 4) == 0.0  # 3 nonzeros in each (padded) group
    with pytest.raises(PatternError):
        zero_rows(torch.ones(3))
    with pytest.raises(PatternError):
        block_occupancy(torch.ones(3, 3), 0, 1)
    with pytest.raises(PatternError):
        nm_conformance(torch.ones(3, 3), 4, 4)


def test_measurements_are_vectorised_fast():
    w = impose_pattern(_dense(768, 3072), "unstructured:0.9")
    fns = [
        lambda: density(w),
        lambda: zero_rows(w),
        lambda: zero_cols(w),
        lambda: block_occupancy(w, 16, 1),
        lambda: nm_conformance(w, 2, 4),
    ]
    for f in fns:
        f()
    t = time.perf_counter()
    for f in fns:
        f()
    # a few ms each when the machine is idle; generous bound for a shared 2-core box
    assert time.perf_counter() - t < 0.5


def test_impose_refuses_a_parametrized_weight_before_changing_any_layer():
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    torch.nn.utils.parametrizations.weight_norm(m[1])
    before = m[0].weight.detach().clone()
    with pytest.raises(PatternError, match="layer '1' has a parametrized weight"):
        impose(m, "unstructured:0.5")
    assert torch.equal(m[0].weight, before)  # nothing half-done
    assert impose(m, "unstructured:0.5", "0") == ["0"]  # the plain layer alone still works
    assert (m[0].weight == 0).sum() == 32


def test_impose_refuses_a_lazy_layer_before_changing_any_layer():
    m = nn.Sequential(nn.Linear(8, 8), nn.LazyLinear(4))
    before = m[0].weight.detach().clone()
    with pytest.raises(PatternError, match="uninitialized"):
        impose(m, "unstructured:0.5")
    assert torch.equal(m[0].weight, before)


@pytest.mark.parametrize("spec", ["unstructured:0.5", "2:4", "block:2x2:0.5"])
def test_impose_refuses_a_meta_weight_with_one_clear_error(spec):
    # a meta tensor has no values to rank: it failed deep in torch (Tensor.item() on meta)
    m = nn.Sequential(nn.Linear(8, 8, device="meta"))
    with pytest.raises(PatternError, match="layer '0' has its weight on the meta device"):
        impose(m, spec)
    with pytest.raises(PatternError, match="meta tensor"):
        impose_pattern(torch.empty(8, 8, device="meta"), spec)


@pytest.mark.parametrize("model, layers, match", [
    ("zoo:mlp-relu", None, "expects a torch.nn.Module, got str"),
    (nn.Sequential(nn.Linear(8, 8)), ["0"], "one glob string"),
])
def test_impose_argument_types(model, layers, match):
    with pytest.raises(PatternError, match=match):
        impose(model, "2:4", layers)
