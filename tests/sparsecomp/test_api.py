"""sparsecomp/api.py helpers (compile itself is tested per backend under tests/backends/)."""

from sparsecomp.api import kernel_names


def test_kernel_names_keep_commas_inside_braces():
    assert kernel_names("dense, tir-sell") == {"dense", "tir-sell"}
    assert kernel_names("dense,union-tir{rows=2,screen=i8},tir-up+tir-down{rows=4,unroll=1}") == {
        "dense", "union-tir{rows=2,screen=i8}", "tir-up+tir-down{rows=4,unroll=1}"}
    assert kernel_names(" ,dense,, ") == {"dense"}
    assert kernel_names("union-tir{rows=2,screen=i8}") != {"union-tir{rows=2", "screen=i8}"}
