"""sparsecomp/api.py helpers (compile itself is tested per backend under tests/backends/)."""

import sys

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


# ---------------------------------------------------------------- what compile runs: sparsify, pipeline


def test_report_pipeline_names_the_sparsify_step_and_reproduces_it(tmp_path):
    """compile(sparsify=...) writes its step into the report's pipeline as the sparsify pass; that
    text given back as pipeline= prunes the same weights, and the result is the pruned model's
    (not the dense one's) function."""
    import sparsecomp as sc
    from sparsecomp.ir import compare_outputs

    m, x = _sparse_mlp()
    torch.nn.init.normal_(m[0].weight)  # dense again: sparsify must do the pruning
    a = sc.compile(m, x, sparsify="magnitude:unstructured:0.9", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert a.report.pipeline == "sparsify-magnitude{pattern=unstructured:0.9},analyze-weights,sparse-linear"
    b = sc.compile(m, x, pipeline=a.report.pipeline, cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert b.report.pipeline == a.report.pipeline
    assert [r["density"] for r in b.report.rows] == [r["density"] for r in a.report.rows] and a.report.rows[0]["density"] < 0.11
    assert b.report.verify["ok"] and b.report.verify["reference"] == "eager"  # eager = the pruned model
    assert any(n.startswith("lossy (asked for): sparsify magnitude:unstructured:0.9") for n in b.report.notes)
    xs = torch.randn(3, 256)
    assert compare_outputs(b(xs), a(xs))[0]
    assert not compare_outputs(b(xs), m(xs))[0]  # the dense model's function: pruned away, not a fallback to it


@pytest.mark.parametrize("spec, options", [
    ("magnitude:unstructured:0.9", {}),
    ("magnitude:block:16x1:0.75", {"skip": ("fc*", "head")}),
    ("wanda:2:4", {"skip": ()}),
    ("wanda:unstructured:0.6", {"allocation": "owl", "owl_m": 7.0, "owl_lambda": 0.05}),
    ("sparsegpt:unstructured:0.5", {"damp": 0.05, "blocksize": 64, "correct": True, "update_bias": True, "refine": 3}),
])
def test_sparsify_config_and_pass_text_round_trip(spec, options):
    from sparsecomp.passes.sparsify import config_from_pass, parse_sparsify_spec, pass_text
    from sparsecomp.pipeline import parse_pipeline

    cfg = parse_sparsify_spec(spec, **options)
    (entry,) = parse_pipeline(pass_text(cfg))
    assert entry.name == f"sparsify-{cfg.method}"
    assert config_from_pass(entry.name, entry.options) == cfg
    assert str(entry) == pass_text(cfg)  # canonical text


def test_sparsify_pass_text_refuses_a_glob_it_cannot_write():
    from sparsecomp.passes.sparsify import SparsifyError, parse_sparsify_spec, pass_text

    with pytest.raises(SparsifyError, match="comma"):
        pass_text(parse_sparsify_spec("magnitude:2:4", skip=("a,b",)))


@pytest.mark.parametrize("options, match", [
    ({"pipeline": 'analyze-weights,sparsify-magnitude{pattern=2:4},sparse-linear'}, "comes after 'analyze-weights'"),
    ({"pipeline": "sparsify-magnitude", "sparsify": "magnitude:2:4"}, "give the sparsification once"),
    ({"pipeline": "sparsify-magnitude{pattern=2:4}"}, "only sparsify passes"),
    ({"pipeline": "analyze-weights,sparse-linear", "activation_sparsity": "exact"}, "give one"),
    ({"pipeline": "analyze-weights,sparse-linaer", "sparsify": "sparsegpt:2:4"}, "unknown pass 'sparse-linaer'"),
])
def test_compile_pipeline_conflicts_are_clear_errors_before_any_work(options, match, monkeypatch):
    import sparsecomp as sc
    import sparsecomp.api as api
    from sparsecomp.errors import SparsecompError

    monkeypatch.setattr(api, "_apply_sparsify", lambda *a: pytest.fail("sparsified before the pipeline was checked"))
    m, x = _sparse_mlp()
    with pytest.raises(SparsecompError, match=match):
        sc.compile(m, x, **options)


def _gelu_mlp():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.GELU(), torch.nn.Linear(96, 16)).eval()
    return m, (torch.randn(1, 32),), [(torch.randn(8, 32),) for _ in range(4)]


KEEP_SPARSE = "torch-up+tir-down"  # the MLP on a sparse kernel, whatever its timing (a tiny MLP)


def _end_to_end_measures(monkeypatch, faster: str):
    from types import SimpleNamespace

    from sparsecomp import timing

    monkeypatch.setattr(timing, "compare", lambda cands, **kw: {
        k: SimpleNamespace(median=1e-3 if k == faster else 2e-3) for k in cands})


def test_lossy_sparse_mlp_named_in_a_pipeline_is_verified_against_the_rewritten_graph(tmp_path, monkeypatch):
    """A threshold sparse-mlp written in pipeline= (not activation_sparsity=) is lossy too: verify's
    reference is the rewritten graph, so the lossy step is kept (not undone by a fallback)."""
    import sparsecomp as sc

    _end_to_end_measures(monkeypatch, faster="compiled")  # (this tiny MLP's timing is not the point)
    m, x, cal = _gelu_mlp()
    text = 'analyze-weights,find-mlps,sparse-mlp{mode="threshold",sparsity=0.5},sparse-linear'
    cm = sc.compile(m, x, pipeline=text, calibration=cal, cache_dir=str(tmp_path), max_seconds_per_layer=0.05,
                    kernels=KEEP_SPARSE)
    assert cm.report.pipeline == 'analyze-weights,find-mlps,sparse-mlp{mode=threshold,sparsity=0.5},sparse-linear'
    assert cm.report.verify["ok"] and cm.report.verify["reference"] == "rewritten graph on reference ops"
    assert any(n.startswith("lossy (asked for): activation sparsity threshold:0.5") for n in cm.report.notes)
    assert not any("fell back" in n for n in cm.report.notes) and cm.report.end_to_end["runs"] == "compiled"
    assert not torch.allclose(cm(*x), m(*x), rtol=1e-4, atol=1e-5)  # skipped neurons: not the dense function
    row = next(r for r in cm.report.rows if r["pattern"].startswith("mlp"))
    assert row["calibration"]["calibrated_sparsity"] >= 0.5


def test_lossy_step_not_run_when_calls_go_to_the_original_model(tmp_path, monkeypatch):
    """Where the compiled graph measures slower end to end, calls go to the original model: the
    report then says the lossy activation sparsity is not applied, instead of 'asked for'."""
    import sparsecomp as sc

    m, x, cal = _gelu_mlp()
    _end_to_end_measures(monkeypatch, faster="eager")
    cm = sc.compile(m, x, activation_sparsity="threshold:0.5", calibration=cal, cache_dir=str(tmp_path),
                    max_seconds_per_layer=0.05, kernels=KEEP_SPARSE)
    assert cm.report.end_to_end["runs"] == "eager"
    assert any(n.startswith("not applied (calls go to the model without it): activation sparsity threshold:0.5")
               for n in cm.report.notes)
    assert not any(n.startswith("lossy (asked for)") for n in cm.report.notes)
    assert torch.equal(cm(*x), m(*x))  # and indeed: the original model's outputs


def test_verify_fallback_keeps_the_pruning_and_says_the_activation_sparsity_is_dropped(tmp_path, monkeypatch):
    """The verify fallback recompiles the (pruned) model with every layer dense: the sparsify step
    still holds and is noted so; the graph's lossy activation sparsity does not run in it."""
    import sparsecomp as sc
    import sparsecomp.ir as ir

    real, calls = ir.compare_outputs, {"n": 0}

    def fail_compiles_first_check(actual, reference, **kw):  # the whole model disagrees (kernels' checks pass)
        if sys._getframe(1).f_code.co_name == "compile":
            calls["n"] += 1
            if calls["n"] == 1:
                return False, 1.0, 0.1
        return real(actual, reference, **kw)

    monkeypatch.setattr(ir, "compare_outputs", fail_compiles_first_check)
    monkeypatch.setattr(ir, "output_cosine", lambda a, b: 0.0)
    m, x, cal = _gelu_mlp()
    cm = sc.compile(m, x, sparsify="magnitude:unstructured:0.5", activation_sparsity="threshold:0.5", calibration=cal,
                    cache_dir=str(tmp_path), max_seconds_per_layer=0.05, kernels=KEEP_SPARSE)
    notes = cm.report.notes
    assert any(n.startswith("lossy (asked for): sparsify magnitude:unstructured:0.5") for n in notes)
    assert any(n.startswith("not applied (the fallback runs the model without it): activation sparsity threshold:0.5")
               for n in notes)
    assert not any(n.startswith("lossy (asked for): activation") for n in notes)
    assert all(r["decision"] == "dense" for r in cm.report.rows)
    assert 0.45 < cm.report.rows[0]["density"] <= 0.5 and calls["n"] == 1  # the pruning held
    assert cm.report.pipeline == "sparsify-magnitude{pattern=unstructured:0.5},analyze-weights"  # what runs
    assert cm.runs == "eager"  # (torch: an all-dense graph only adds call overhead)
    assert any(n.endswith("calls go to the pruned model, uncompiled") for n in notes), notes  # not the user's
    assert cm.report.verify["reference"] == "eager (the fallback runs the model itself)"
    assert cm._eager[0] is not m and float((cm._eager[0][0].weight == 0).float().mean()) == 0.5


def test_compile_with_a_cache_it_cannot_write_works_and_says_so(tmp_path, monkeypatch, caplog):
    import logging

    import sparsecomp as sc
    from sparsecomp.backends.tir import clear_memory_cache
    from sparsecomp.ir import compare_outputs

    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "afile"))  # decisions and kernels both under it
    clear_memory_cache()  # so kernels are built (and their disk writes fail) in this test
    m, x = _sparse_mlp()
    with caplog.at_level(logging.WARNING):
        cm = sc.compile(m, x, max_seconds_per_layer=0.05)
    assert cm.report.cache["written"] == 0
    assert any("could not be written (NotADirectoryError" in n for n in cm.report.notes), cm.report.notes
    assert compare_outputs(cm(*x), m(*x))[0]
    # the kernels' own warning: once for the folder, not once per kernel built (31 lines on the CLI)
    said = [r for r in caplog.records if "cannot cache kernels on disk" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]


def test_compiled_model_is_for_inference(tmp_path):
    import sparsecomp as sc
    from sparsecomp.errors import SparsecompError

    m, x = _sparse_mlp()
    cm = sc.compile(m, x, cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert cm.eval() is cm and not cm.training
    with pytest.raises(SparsecompError, match="compiled for inference"):
        cm.train()


def test_report_of_a_pipeline_without_analyze_weights_renders(tmp_path):
    """sparse-linear measures the weights itself without analyze-weights: the rows take the shape
    and density the backend saw, and the table prints."""
    import sparsecomp as sc

    m, x = _sparse_mlp()
    cm = sc.compile(m, x, pipeline="sparse-linear", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert [r["shape"] for r in cm.report.rows] == [[512, 256], [128, 512]]
    assert all(abs(r["density"] - 0.05) < 0.01 for r in cm.report.rows)
    assert "512x256" in _render(cm.report)


def _render(report) -> str:
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(report)
    return console.export_text()


@pytest.mark.parametrize("env, match", [("0", ">= 1"), ("-2", ">= 1"), ("abc", "not an integer"), ("100000", "more than 4x")])
def test_every_reader_of_the_thread_setting_checks_it_alike(monkeypatch, env, match):
    """set_num_threads, the ort backend's sessions and the TIR pool read SPARSECOMP_NUM_THREADS
    through one parser: a bad value is the same clear error everywhere (it was 1 in one place,
    every CPU in another)."""
    from sparsecomp import set_num_threads
    from sparsecomp.backends.ort.runner import threads
    from sparsecomp.backends.tir._target import _default_threads
    from sparsecomp.errors import SparsecompError

    monkeypatch.setenv("SPARSECOMP_NUM_THREADS", env)
    for read in (set_num_threads, threads, _default_threads):
        with pytest.raises(SparsecompError, match=match):
            read()
    monkeypatch.setenv("SPARSECOMP_NUM_THREADS", "2")
    assert threads() == _default_threads() == 2


def test_the_env_thread_setting_reaches_torch_at_the_first_compile(monkeypatch):
    """SPARSECOMP_NUM_THREADS is the one thread setting for torch, TVM and ORT alike (DESIGN.md
    section 2): torch takes it at the first compile (importing sparsecomp changes nothing), and a
    later torch.set_num_threads of the user's is not overridden by the next compile."""
    import sparsecomp as sc
    import sparsecomp.threads as threads

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_applied_to_torch", None)
    monkeypatch.setenv("SPARSECOMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    try:
        m = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
        sc.compile(m, (torch.randn(2, 16),), max_seconds_per_layer=0.02, use_tir=False)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)  # the user's own choice afterwards
        sc.compile(m, (torch.randn(2, 16),), max_seconds_per_layer=0.02, use_tir=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
