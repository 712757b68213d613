"""`sparsecomp.memory`: kernel arrays moved onto transparent huge pages, in place."""

import pytest
import torch

from sparsecomp import memory


def _collapse_works() -> bool:
    if not memory.huge_pages_available():
        return False
    probe = torch.ones(3 * memory.HUGE_PAGE // 4)
    memory.prefer_huge_pages(probe)
    return memory.huge_page_bytes(probe) > 0


def test_values_and_identity_are_kept():
    """In place: the same tensor comes back, its values untouched (a view's base storage too)."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3 * memory.MIN_BYTES // 4, generator=g)
    want = big.clone()
    assert memory.prefer_huge_pages(big) is big and torch.equal(big, want)
    view = big[8:].view(-1, 8)[:, 1:]  # a non-contiguous view: its storage is what moves
    assert memory.prefer_huge_pages(view) is view and torch.equal(big, want)
    small = torch.randn(100, generator=g)
    assert memory.prefer_huge_pages(small) is small


def test_big_arrays_land_on_huge_pages():
    if not _collapse_works():
        pytest.skip("this system grants no transparent huge pages to madvise (THP off or kernel < 6.1)")
    t = torch.randn(6 * memory.HUGE_PAGE // 4)  # 6 MiB: at least two whole huge pages inside
    memory.prefer_huge_pages(t)
    assert memory.huge_page_bytes(t) >= 2 * memory.HUGE_PAGE
    # below MIN_BYTES nothing is asked of the system, and memory outside a tensor is never touched
    s = torch.randn(memory.MIN_BYTES // 8)
    before = memory.huge_page_bytes(s)
    memory.prefer_huge_pages(s)
    assert memory.huge_page_bytes(s) == before


def test_without_huge_pages_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(memory, "huge_pages_available", lambda: False)
    t = torch.randn(memory.MIN_BYTES)
    calls = []
    monkeypatch.setattr(memory, "_libc", lambda: calls.append(1))
    assert memory.prefer_huge_pages(t) is t and not calls
