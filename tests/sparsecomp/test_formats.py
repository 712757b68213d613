"""Packed sparse formats: exact round trips, byte estimates, structure (sparsecomp/formats.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecomp.errors import PatternError, SparsecompError
from sparsecomp.formats import (
    BSR,
    CSR,
    ELL,
    FORMATS,
    NM,
    SELL,
    as_index,
    index_dtype,
    pack_format,
    pointer_dtype,
)
from sparsecomp.patterns import impose_pattern

SETTINGS = settings(max_examples=60, deadline=None)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random_dense(rows, cols, dens, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols, generator=g) < dens
    # exact 0 and 1 must mean all-zero / all-nonzero, whatever rand returns
    if dens >= 1.0:
        keep[:] = True
    vals = torch.where(vals == 0, torch.ones_like(vals), vals)
    return (vals * keep).to(dtype)


dense_st = st.builds(
    _random_dense,
    rows=st.integers(1, 70),
    cols=st.integers(1, 70),
    dens=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1)),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
)


def _check(fmt_cls, dense, **params):
    packed = fmt_cls.pack(dense, **params)
    back = packed.to_dense()
    assert back.dtype == dense.dtype and back.shape == dense.shape
    assert torch.equal(back, dense)
    assert packed.shape == tuple(dense.shape)
    assert fmt_cls.estimate_nbytes(dense, **params) == packed.nbytes()
    assert packed.nbytes() == sum(t.numel() * t.element_size() for t in packed.arrays().values())
    return packed


# ---------------------------------------------------------------------------------------------
# property tests: every format round-trips exactly and estimates its bytes exactly


@SETTINGS
@given(dense_st)
def test_csr_round_trip(dense):
    p = _check(CSR, dense)
    assert p.nnz() == int(torch.count_nonzero(dense))


@SETTINGS
@given(dense_st, st.integers(1, 16), st.integers(1, 16), st.sampled_from(["rc", "cr"]))
def test_bsr_round_trip(dense, r, c, layout):
    p = _check(BSR, dense, blocksize=(r, c), layout=layout)
    expect_shape = (r, c) if layout == "rc" else (c, r)
    assert p.values.shape[1:] == expect_shape


@SETTINGS
@given(dense_st, st.sampled_from([1, 3, 8, 16, 32]), st.sampled_from([1, 2, 7, 16, 64]))
def test_sell_round_trip(dense, slice_height, sigma):
    p = _check(SELL, dense, slice_height=slice_height, sigma=sigma)
    # each slice is exactly as wide as its longest row
    rows = dense.shape[0]
    counts = (dense != 0).sum(dim=1)
    if p.row_perm is not None:
        counts = counts[as_index(p.row_perm)]
    padded = torch.zeros(-(-rows // slice_height) * slice_height, dtype=counts.dtype)
    padded[:rows] = counts
    assert torch.equal(p.slice_widths(), padded.view(-1, slice_height).amax(dim=1))


@SETTINGS
@given(dense_st)
def test_ell_round_trip(dense):
    p = _check(ELL, dense)
    assert p.width == int((dense != 0).sum(dim=1).max())
    assert p.values_2d().shape == (dense.shape[0], p.width)


@SETTINGS
@given(dense_st, st.integers(2, 9), st.data())
def test_nm_round_trip(dense, m, data):
    n = data.draw(st.integers(1, m - 1))
    w = impose_pattern(dense, f"{n}:{m}")
    p = _check(NM, w, n=n, m=m)
    g = -(-w.shape[1] // m)
    assert p.values.shape == (w.shape[0], g * n) and p.idx.dtype == torch.uint8
    idx = p.idx.view(w.shape[0], g, n).to(torch.int64)
    assert torch.all(idx < m)
    assert torch.all(idx[..., 1:] > idx[..., :-1]), "positions ascend within a group"


# ---------------------------------------------------------------------------------------------
# edge cases


EDGE_CASES = {
    "1x1 zero": torch.zeros(1, 1),
    "1x1 one": torch.ones(1, 1),
    "all zero": torch.zeros(9, 13),
    "fully dense": torch.arange(1.0, 9 * 13 + 1).view(9, 13),
    "zero rows": torch.tensor([[0.0, 0, 0, 0, 0], [1, 2, 0, 0, 3], [0, 0, 0, 0, 0], [0, 0, 0, 0, 4]]),
    "one row": torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 6.0, 7.0]]),
    "one col": torch.tensor([[1.0], [0.0], [2.0]]),
}

PARAMS = [
    (CSR, {}),
    (BSR, {"blocksize": (1, 1)}),
    (BSR, {"blocksize": (2, 3)}),
    (BSR, {"blocksize": (16, 1), "layout": "cr"}),
    (SELL, {"slice_height": 2, "sigma": 4}),
    (SELL, {"slice_height": 8}),
    (ELL, {}),
]


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("fmt_cls, params", PARAMS, ids=lambda v: getattr(v, "name", str(v)))
def test_edge_cases(case, fmt_cls, params):
    _check(fmt_cls, EDGE_CASES[case], **params)


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_nm_edge_cases(case):
    _check(NM, impose_pattern(EDGE_CASES[case], "2:4"), n=2, m=4)


def test_all_zero_stores_nothing():
    z = torch.zeros(9, 13)
    assert CSR.pack(z).values.numel() == 0
    assert BSR.pack(z, blocksize=(4, 4)).values.numel() == 0
    assert SELL.pack(z, slice_height=4).values.numel() == 0


@pytest.mark.parametrize("fmt_cls, params", PARAMS + [(NM, {"n": 2, "m": 4})], ids=lambda v: getattr(v, "name", str(v)))
def test_nan_inf_kept_negative_zero_dropped(fmt_cls, params):
    w = torch.tensor([[float("nan"), 0.0, -0.0, float("inf")], [0.0, -float("inf"), 0.0, 2.0]])
    back = fmt_cls.pack(w, **params).to_dense()
    torch.testing.assert_close(back, w, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# structure: matches torch's own layouts where torch has one


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_csr_matches_torch_layout():
    w = _random_dense(23, 31, 0.3, seed=3)
    p = CSR.pack(w)
    ref = w.to_sparse_csr()
    assert torch.equal(as_index(p.row_ptr), ref.crow_indices())
    assert torch.equal(as_index(p.col_idx), ref.col_indices())
    assert torch.equal(p.values, ref.values())
    assert p.col_idx.dtype == torch.uint16 and p.row_ptr.dtype == torch.int32


@pytest.mark.parametrize("blocksize", [(4, 4), (2, 8), (8, 1)])
def test_bsr_matches_torch_layout(blocksize):
    w = impose_pattern(_random_dense(32, 48, 1.0, seed=4), f"block:{blocksize[0]}x{blocksize[1]}:0.75")
    p = BSR.pack(w, blocksize=blocksize)
    ref = w.to_sparse_bsr(blocksize)
    assert torch.equal(as_index(p.row_ptr), ref.crow_indices())
    assert torch.equal(as_index(p.col_idx), ref.col_indices())
    assert torch.equal(p.values, ref.values())
    cr = BSR.pack(w, blocksize=blocksize, layout="cr")
    assert torch.equal(cr.values, ref.values().transpose(1, 2)) and cr.values.is_contiguous()


def test_sell_column_major_slices():
    w = torch.tensor([[1.0, 0, 2, 0], [0, 3, 0, 0], [4, 5, 6, 0]])
    p = SELL.pack(w, slice_height=2)
    # slice 0 (rows 0,1): width 2 -> [r0e0, r1e0, r0e1, r1e1(pad)]; slice 1 (row 2 + pad row): width 3
    assert torch.equal(p.values, torch.tensor([1.0, 3, 2, 0, 4, 0, 5, 0, 6, 0]))
    assert torch.equal(as_index(p.col_idx), torch.tensor([0, 1, 2, 0, 0, 0, 1, 0, 2, 0]))
    assert torch.equal(as_index(p.slice_ptr), torch.tensor([0, 4, 10]))
    assert p.row_perm is None


def test_sell_sigma_sorts_within_windows_and_saves_padding():
    # rows alternate long/short: unsorted slices of 2 each pay for a long row
    w = _random_dense(64, 64, 0.05, seed=5)
    w[::2, :40] = 1.0
    plain = SELL.pack(w, slice_height=2)
    sorted_ = SELL.pack(w, slice_height=2, sigma=8)
    perm = as_index(sorted_.row_perm)
    assert torch.equal(torch.sort(perm).values, torch.arange(64))
    counts = (w != 0).sum(dim=1)[perm].view(8, 8)
    assert torch.all(counts[:, 1:] <= counts[:, :-1]), "descending nnz within each window"
    assert torch.equal(torch.sort(perm.view(8, 8), dim=1).values, torch.arange(64).view(8, 8)), "stays in its window"
    assert sorted_.values.numel() < plain.values.numel()
    assert torch.equal(sorted_.to_dense(), w)


@SETTINGS
@given(dense_st, st.sampled_from([2, 4, 8]), st.integers(1, 4))
def test_sell_sigma_multiple_of_c_never_pads_more(dense, c, k):
    assert SELL.pack(dense, slice_height=c, sigma=c * k).values.numel() <= SELL.pack(dense, slice_height=c).values.numel()


def test_ell_is_one_slice():
    w = torch.tensor([[1.0, 0, 2], [0, 0, 0], [0, 3, 0]])
    p = ELL.pack(w)
    assert p.width == 2 and as_index(p.slice_ptr).tolist() == [0, 6]
    assert torch.equal(p.values_2d(), torch.tensor([[1.0, 2], [0, 0], [3, 0]]))
    assert torch.equal(as_index(p.col_idx_2d()), torch.tensor([[0, 2], [0, 0], [1, 0]]))


def test_nm_metadata_and_tail():
    w = torch.tensor([[0.0, 7, 0, 8, 0, 0, 9]])  # groups [0,7,0,8] and tail [0,0,9]
    p = NM.pack(w, n=2, m=4)
    assert torch.equal(p.values, torch.tensor([[7.0, 8, 0, 9]]))
    # the tail group fills its spare slot with its lowest zero position
    assert p.idx.tolist() == [[1, 3, 0, 2]]
    assert p.column_indices().tolist() == [[1, 3, 4, 6]]


def test_nm_tail_shorter_than_n_points_into_padding():
    w = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8, 9]])  # 4:8 with a tail of 1
    p = NM.pack(impose_pattern(w, "4:8"), n=4, m=8)
    assert p.idx.tolist()[0][4:] == [0, 1, 2, 3]
    assert p.column_indices().max() == 11  # past in_features - 1 = 8, in the zero padding
    assert torch.equal(p.to_dense(), impose_pattern(w, "4:8"))


def test_nm_rejects_non_conformant_weight_naming_row_and_group():
    w = torch.zeros(3, 8)
    w[2, 4:7] = 1.0
    with pytest.raises(PatternError) as ei:
        NM.pack(w, n=2, m=4)
    assert "row 2, group 1" in ei.value.message and "3 nonzeros" in ei.value.message
    assert "2:4" in ei.value.message


@pytest.mark.parametrize("n, m", [(0, 4), (4, 4), (5, 4), (2, 300)])
def test_nm_bad_params(n, m):
    with pytest.raises(PatternError):
        NM.pack(torch.zeros(2, 8), n=n, m=m)


# ---------------------------------------------------------------------------------------------
# index dtypes


def test_index_dtype_rule():
    assert index_dtype(0) == torch.uint16
    assert index_dtype(65535) == torch.uint16
    assert index_dtype(65536) == torch.int32
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64
    assert pointer_dtype(10) == torch.int32
    assert pointer_dtype(2**31) == torch.int64


def test_wide_weight_uses_int32_columns():
    w = torch.zeros(2, 70_000)
    w[0, 69_999] = 1.0
    w[1, 3] = 2.0
    for fmt_cls, params in [(CSR, {}), (SELL, {"slice_height": 2}), (ELL, {})]:
        p = _check(fmt_cls, w, **params)
        assert p.col_idx.dtype == torch.int32
    assert BSR.pack(w, blocksize=(1, 1)).col_idx.dtype == torch.int32
    assert BSR.pack(w, blocksize=(1, 2)).col_idx.dtype == torch.uint16  # 35000 block columns fit


def test_narrow_indices_shrink_bytes():
    w = _random_dense(64, 64, 0.1, seed=7)
    p = CSR.pack(w)
    nnz = p.nnz()
    assert p.nbytes() == nnz * 4 + nnz * 2 + 65 * 4


# ---------------------------------------------------------------------------------------------
# registry and errors


def test_registry_names():
    assert set(FORMATS) == {"csr", "bsr", "sell", "ell", "nm"}
    w = impose_pattern(_random_dense(10, 12, 1.0, seed=8), "2:4")
    for name, params in [("csr", {}), ("bsr", {"blocksize": (2, 2)}), ("sell", {"slice_height": 4}), ("ell", {}), ("nm", {})]:
        p = pack_format(name, w, **params)
        assert isinstance(p, FORMATS[name]) and torch.equal(p.to_dense(), w)
        assert name in repr(type(p)).lower()


def test_pack_format_errors():
    w = torch.ones(4, 4)
    with pytest.raises(SparsecompError) as ei:
        pack_format("coo", w)
    assert "csr" in ei.value.hint
    with pytest.raises(SparsecompError) as ei:
        pack_format("bsr", w)
    assert "blocksize" in ei.value.message
    with pytest.raises(SparsecompError) as ei:
        pack_format("sell", w, block=4)
    assert "'block'" in ei.value.message and "slice_height" in ei.value.hint


@pytest.mark.parametrize(
    "call",
    [
        lambda: CSR.pack(torch.ones(2, 3, 4)),
        lambda: BSR.pack(torch.ones(4, 4), blocksize=(0, 2)),
        lambda: BSR.pack(torch.ones(4, 4), blocksize=(2, 2), layout="xy"),
        lambda: SELL.pack(torch.ones(4, 4), slice_height=0),
        lambda: SELL.pack(torch.ones(4, 4), sigma=0),
        lambda: NM.pack(torch.ones(4), n=2, m=4),
    ],
)
def test_bad_inputs_raise_sparsecomp_error(call):
    with pytest.raises(SparsecompError):
        call()
