"""sparsecomp/api.py helpers (compile itself is tested per backend under tests/backends/)."""

import pytest
import torch

from sparsecomp.api import kernel_names


def test_kernel_names_keep_commas_inside_braces():
    assert kernel_names("dense, tir-sell") == {"dense", "tir-sell"}
    assert kernel_names("dense,union-tir{rows=2,screen=i8},tir-up+tir-down{rows=4,unroll=1}") == {
        "dense", "union-tir{rows=2,screen=i8}", "tir-up+tir-down{rows=4,unroll=1}"}
    assert kernel_names(" ,dense,, ") == {"dense"}
    assert kernel_names("union-tir{rows=2,screen=i8}") != {"union-tir{rows=2", "screen=i8}"}


def test_compile_of_a_model_in_training_mode_says_it_switched_to_eval():
    import sparsecomp as sc
    from sparsecomp import patterns
    from sparsecomp.ir import compare_outputs

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Dropout(0.5), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    patterns.impose(m, "unstructured:0.9")
    assert m.training
    x = torch.randn(4, 64)
    cm = sc.compile(m, (x,), max_seconds_per_layer=0.05)
    assert not m.training  # compiled for inference, and its fallback runs it so
    assert any("training mode" in n for n in cm.report.notes)
    ok, err, allowed = compare_outputs(cm(x), m(x))
    assert ok, (err, allowed)


def _sparse_mlp(seed=0):
    from sparsecomp import patterns

    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128)).eval()
    patterns.impose(m, "unstructured:0.95")
    return m, (torch.randn(1, 256),)


@pytest.mark.parametrize("options, match", [
    ({"kernels": ["dense"]}, "one comma-separated string"),
    ({"max_seconds_per_layer": -1}, "positive number"),
    ({"max_seconds_per_layer": float("nan")}, "positive number"),
    ({"max_seconds_per_layer": "0.1"}, "positive number"),
])
def test_compile_checks_its_options_first(options, match):
    import sparsecomp as sc
    from sparsecomp.errors import SparsecompError

    m, x = _sparse_mlp()
    with pytest.raises(SparsecompError, match=match):
        sc.compile(m, x, **options)


def test_compile_cache_dir_that_is_a_file(tmp_path):
    import sparsecomp as sc
    from sparsecomp.errors import SparsecompError

    f = tmp_path / "afile"
    f.write_text("x")
    m, x = _sparse_mlp()
    with pytest.raises(SparsecompError, match="not a directory"):
        sc.compile(m, x, cache_dir=str(f))


def test_kernel_names_that_match_nothing_are_named():
    import sparsecomp as sc
    from sparsecomp.errors import SparsecompError

    m, x = _sparse_mlp()
    with pytest.raises(SparsecompError, match="kernels='foo': no name matched a candidate kernel"):
        sc.compile(m, x, kernels="foo", max_seconds_per_layer=0.05)
    cm = sc.compile(m, x, kernels="dense,tir-selll", max_seconds_per_layer=0.05)  # a typo beside a real name
    assert any("'tir-selll' matched no candidate kernel" in n for n in cm.report.notes)
    assert all(r["kernel"] == "dense" for r in cm.report.rows)
    dense_model = torch.nn.Sequential(torch.nn.Linear(256, 64)).eval()  # nothing sparse: no layer to match names against
    cm = sc.compile(dense_model, x, kernels="dense,torch-csr", max_seconds_per_layer=0.05)
    assert not any("matched no candidate" in n for n in cm.report.notes)


def test_report_without_dense_timed_shows_no_nan():
    import sparsecomp as sc

    m, x = _sparse_mlp()
    cm = sc.compile(m, x, kernels="torch-csr", max_seconds_per_layer=0.05)
    text = str(cm.report.to_dict()) + " ".join(r["reason"] for r in cm.report.rows)
    assert "nan" not in text.replace("nan_", "")
    assert any("dense was not timed" in r["reason"] for r in cm.report.rows)
    assert cm.report.to_dict()["summary"]["layer_speedup"] is None  # no layer timed both ways


@pytest.mark.parametrize("calibration, match", [
    (5, "must be an iterable of input batches"),
    ([5], "batch 0 for Sequential is not an input batch"),
    (torch.randn(4, 64), r"batch 0 does not fit the model's inputs: got \(float32\[64\]\), expected inputs like \(float32\[4, 64\]\)"),
    ([(torch.randn(4, 64),), (torch.randn(4, 65),)], r"batch 1 does not fit.*float32\[4, 65\]"),
])
def test_analyze_checks_calibration_batches(calibration, match):
    import sparsecomp as sc
    from sparsecomp.errors import SparsecompError

    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).eval()
    with pytest.raises(SparsecompError, match=match):
        sc.analyze(m, (torch.randn(4, 64),), calibration=calibration)
    report = sc.analyze(m, (torch.randn(4, 64),), calibration=[(torch.randn(7, 64),)])  # another batch size fits
    assert [a.name for a in report.activations] == ["0", "2"]


@pytest.mark.parametrize("n, env, match", [
    ("2", None, "must be an int"),
    (2.5, None, "must be an int"),
    (0, None, ">= 1"),
    (100000, None, "more than 4x"),
    (None, "abc", "SPARSECOMP_NUM_THREADS='abc' is not an integer"),
])
def test_set_num_threads_checks_its_argument(monkeypatch, n, env, match):
    import sparsecomp as sc
    from sparsecomp.errors import SparsecompError

    before = torch.get_num_threads()
    if env is not None:
        monkeypatch.setenv("SPARSECOMP_NUM_THREADS", env)
    with pytest.raises(SparsecompError, match=match):
        sc.set_num_threads(n)
    assert torch.get_num_threads() == before  # nothing changed


def test_analyze_calibration_of_a_captured_graph_and_an_empty_one():
    """A GraphModule captured earlier has no example inputs: its batches are checked against the
    graph's own inputs. An empty calibration is as none (the weights' report alone)."""
    import sparsecomp as sc
    from sparsecomp.errors import SparsecompError
    from sparsecomp.frontend import capture

    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    gm = capture(m, (torch.randn(4, 16),))
    assert len(sc.analyze(gm, calibration=[(torch.randn(7, 16),)]).activations) == 2
    with pytest.raises(SparsecompError, match=r"got \(float32\[4, 17\]\), expected inputs like \(float32\[.*, 16\]\)"):
        sc.analyze(gm, calibration=[(torch.randn(4, 17),)])
    report = sc.analyze(m, (torch.randn(4, 16),), calibration=[])
    assert report.activations == [] and len(report.layers) == 2


def test_numpy_scalars_are_numbers_too():
    import numpy as np

    import sparsecomp as sc
    from sparsecomp.api import _check_options

    n = torch.get_num_threads()
    assert sc.set_num_threads(np.int64(n)) == n and torch.get_num_threads() == n
    _check_options(kernels=None, max_seconds_per_layer=np.float32(0.5), cache_dir=None)  # no error
