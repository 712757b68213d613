"""The `sparsecomp` CLI: the issue's done-when commands, and one clear line for every bad input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsecomp.cli import main

VENV_BIN = Path(sys.executable).parent


def run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_analyze_json_nm_only_where_imposed(capsys):
    code, out, _ = run(capsys, "analyze", "zoo:bert-tiny", "--impose", "2:4", "--layers", "*intermediate*", "--json")
    assert code == 0
    report = json.loads(out)
    conformant = {l["name"] for l in report["layers"] if l["nm_conformance"]["2:4"] == 1.0}
    assert conformant == {"encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"}
    for layer in report["layers"]:  # the schema the issue promises
        assert {"name", "shape", "density", "nm_conformance", "block_occupancy", "zero_rows", "zero_cols"} <= set(layer)
        assert set(layer["nm_conformance"]) == {"2:4", "4:8"}
    assert report["schema"] == 1 and report["summary"]["layers"] == 12


def test_analyze_block_occupancy(capsys):
    code, out, _ = run(capsys, "analyze", "zoo:bert-tiny", "--impose", "block:16x1:0.9", "--json")
    assert code == 0
    for layer in json.loads(out)["layers"]:
        out_f, in_f = layer["shape"]
        n_blocks = -(-out_f // 16) * in_f
        assert abs(layer["block_occupancy"]["16x1"] - 0.1) <= 1 / n_blocks + 1e-12, layer["name"]


def test_analyze_table_with_calibration(capsys):
    code, out, _ = run(capsys, "analyze", "zoo:bert-tiny", "--calib", "2")
    assert code == 0
    assert "sparsity of bert-tiny" in out and "input zeros" in out and "MLP regions" in out


def test_opt_prints_after_each_pass_and_dumps(capsys, tmp_path):
    d = tmp_path / "dump"
    code, out, _ = run(capsys, "opt", "zoo:mlp-relu", "--pipeline", "analyze-weights,find-mlps",
                       "--print-ir-after-all", "--dump-dir", str(d), "--timing", "--verify-each")
    assert code == 0
    assert out.count("// ----- IR after") == 2
    assert "IR after analyze-weights (1/2)" in out and "IR after find-mlps (2/2)" in out
    assert "mlp(region=0, role=up)" in out and "pass timing" in out
    assert sorted(p.name for p in d.iterdir()) == ["000_input.txt", "001_analyze-weights.txt", "002_find-mlps.txt"]
    assert (d / "001_analyze-weights.txt").read_text().startswith("// pipeline: analyze-weights,find-mlps")


def test_opt_print_after_one_pass(capsys):
    code, out, _ = run(capsys, "opt", "zoo:bert-tiny", "-p", "analyze-weights,find-mlps", "--print-ir-after", "find-mlps")
    assert code == 0 and out.count("// ----- IR after") == 1 and "after find-mlps" in out


def test_passes_lists_and_documents(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0 and "analyze-weights" in out and "profile-activations" in out
    code, out, _ = run(capsys, "passes", "analyze-weights")
    assert code == 0 and "Requires:" in out and "Ensures:" in out and "blocks" in out


def test_option_docs_keep_their_continuation_lines():
    from sparsecomp.registry import get_pass

    rank = get_pass("sparse-mlp").options["rank"].doc  # a docstring option spread over two lines
    assert rank.startswith("predictor rank (0:") and rank.endswith("at most 256).")
    assert all(o.doc for o in get_pass("sparsify-sparsegpt").options.values())


def test_opt_lossy_pass_with_verify_each_and_a_pass_not_in_the_pipeline(capsys, tmp_path):
    f = write_factory(tmp_path, BOOM)
    code, _, err = run(capsys, "opt", f"{f}:make", "-p", "sparsify-magnitude{pattern=unstructured:0.5},analyze-weights,sparse-linear",
                       "--verify-each")
    assert code == 0, err
    assert "'sparsify-magnitude{pattern=unstructured:0.5}' is lossy (asked for)" in err and "every pass checked (3 passes" in err
    code, _, err = run(capsys, "opt", f"{f}:boom", "-p", "analyze-weights", "--print-ir-after", "sparse-linear")
    assert code == 2 and "does not run it" in err and "factory exploded" not in err


def write_factory(tmp_path, body):
    f = tmp_path / "my_model.py"
    f.write_text(textwrap.dedent(body))
    return f


def test_factory_model_and_weights(capsys, tmp_path):
    f = write_factory(tmp_path, """
        import torch
        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)), (torch.randn(2, 8),)
        def boom():
            raise RuntimeError("factory exploded")
    """)
    code, out, _ = run(capsys, "analyze", f"{f}:make", "--json", "--calib", "2")
    assert code == 0
    report = json.loads(out)
    assert [l["name"] for l in report["layers"]] == ["0", "2"]
    assert report["layers"][1]["activation"]["zero_fraction"] > 0  # relu zeros seen on random calibration
    # --weights: a state dict with a zeroed layer
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    sd = m.state_dict()
    sd["0.weight"].zero_()
    torch.save(sd, tmp_path / "w.pt")
    code, out, _ = run(capsys, "analyze", f"{f}:make", "--weights", str(tmp_path / "w.pt"), "--json")
    assert code == 0 and json.loads(out)["layers"][0]["density"] == 0.0
    code, _, err = run(capsys, "analyze", f"{f}:boom")
    assert code == 2 and "factory 'boom' raised RuntimeError: factory exploded" in err
    code, _, err = run(capsys, "analyze", f"{f}:nope")
    assert code == 2 and "has no function 'nope'" in err and "make" in err


def test_nan_weight_is_analysed_and_flagged(capsys, tmp_path):
    f = write_factory(tmp_path, """
        import torch
        def make():
            m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
            with torch.no_grad():
                m[1].weight[0, 0] = float("nan")
            return m, (torch.randn(1, 4),)
    """)
    code, out, _ = run(capsys, "analyze", f"{f}:make", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["summary"]["flagged"] == ["1"]
    assert report["layers"][1]["nan"] == 1 and report["layers"][1]["flags"] == ["NaN:1"]


@pytest.mark.parametrize("argv,needle", [
    (["analyze", "zoo:nope"], "unknown zoo model 'nope'"),
    (["analyze", "missing.onnx"], "missing.onnx"),
    (["analyze", "missing.py:make"], "no such file 'missing.py'"),
    (["analyze", "whatever"], "cannot read MODEL 'whatever'"),
    (["opt", "zoo:mlp-relu", "--pipeline", "analyze-weights,find-mlp"], "unknown pass 'find-mlp'"),
    (["opt", "zoo:mlp-relu", "--pipeline", "find-mlps{min_hidden=x}"], "expects int"),
    (["analyze", "zoo:bert-tiny", "--impose", "2:5:1"], "bad weight pattern"),
    (["analyze", "zoo:bert-tiny", "--impose", "2:4", "--layers", "*nothing*"], "matches no Linear/Conv layer"),
    (["analyze", "zoo:bert-tiny", "--layers", "*x*"], "give --impose SPEC too"),
    (["analyze", "zoo:bert-tiny", "--weights", "nope.pt"], "no such file 'nope.pt'"),
    (["compile", "zoo:bert-tiny", "--backend", "tvm"], "not yet available"),
    (["compile", "zoo:bert-tiny", "--backend", "cuda"], "unknown backend 'cuda'"),
    (["sparsify", "zoo:bert-tiny", "--pattern", "unstructured:1.0"], "in [0, 1)"),
    (["passes", "nope"], "unknown pass 'nope'"),
])
def test_bad_input_gets_one_line_and_nonzero_exit(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err + out
    assert err.splitlines()[0].startswith("error: ") and len([l for l in err.splitlines() if l.startswith("error:")]) == 1


def test_garbage_onnx_file(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    code, _, err = run(capsys, "analyze", str(bad))
    assert code == 2 and "bad.onnx" in err and "Traceback" not in err


def test_debug_shows_the_trace(tmp_path):
    r = subprocess.run([str(VENV_BIN / "sparsecomp"), "analyze", "zoo:nope", "--debug"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "ModelLoadError" in r.stderr


def test_console_script_and_no_top_level_passes_module(tmp_path):
    # Run from another directory: from the repo root, the folder `passes/` would shadow the check.
    code = ("import importlib.util, sparsecomp.passes, sparsecomp.backends, sparsecomp.models; "
            "assert importlib.util.find_spec('passes') is None; assert importlib.util.find_spec('backends') is None; "
            "assert importlib.util.find_spec('models') is None; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, COLUMNS="200")
    r = subprocess.run([str(VENV_BIN / "sparsecomp"), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "analyze" in r.stdout and "sparsify" in r.stdout


def test_import_is_light(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import sys, sparsecomp; print('torch' in sys.modules, 'tvm' in sys.modules)"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-opset20", "legacy-opset17"])
def test_onnx_file_of_a_2_4_pruned_mlp(capsys, tmp_path, dynamo):
    from sparsecomp import patterns

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
    patterns.impose(m, "2:4", "0")
    path = tmp_path / "mlp.onnx"
    kw = {"dynamo": True} if dynamo else {"dynamo": False, "opset_version": 17}
    torch.onnx.export(m, (torch.randn(2, 64),), str(path), **kw)
    capsys.readouterr()  # the exporter's own progress lines
    code, out, _ = run(capsys, "analyze", str(path), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["source"] == "onnx"
    by_shape = {tuple(l["shape"]): l for l in report["layers"]}
    assert by_shape[(128, 64)]["nm_conformance"]["2:4"] == 1.0  # groups along in_features, after the transpose
    assert by_shape[(32, 128)]["nm_conformance"]["2:4"] < 1.0
    code, out, _ = run(capsys, "opt", str(path), "--pipeline", "analyze-weights,find-mlps", "--print-ir-after-all")
    assert code == 0 and out.count("// ----- IR after") == 2
    # an ONNX file records no example inputs: verify-each / calibration on random ones of its input types
    code, out, err = run(capsys, "opt", str(path), "-p", "analyze-weights,sparse-linear", "--verify-each", "--calib", "2")
    assert code == 0, err
    assert "random inputs of its input types" in err and "verify-each: every pass checked (2 passes" in err
    code, _, err = run(capsys, "demo", "--model", str(path))
    assert code == 2 and "demo needs a torch model" in err and "Traceback" not in err
    code, _, err = run(capsys, "bench", str(path), "--backend", "torch")
    assert code == 2 and "--backend torch does not apply" in err


def test_compile_and_bench(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "cache"))
    f = write_factory(tmp_path, """
        import torch
        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16)), (torch.randn(4, 64),)
    """)
    code, out, _ = run(capsys, "compile", f"{f}:make", "--impose", "unstructured:0.9", "--layers", "0",
                       "--kernels", "dense,torch-csr", "--max-seconds", "0.05", "--json")
    assert code == 0
    report = json.loads(out)
    rows = {r["layer"]: r for r in report["layers"]}
    assert rows["0"]["pattern"] == "unstructured" and rows["0"]["kernel"] in ("dense", "torch-csr")
    assert rows["2"]["decision"] == "dense" and "not rewritten" in rows["2"]["reason"]
    assert report["verify"]["ok"] and report["end_to_end"]["runs"] in ("eager", "compiled")
    code, out, _ = run(capsys, "compile", f"{f}:make", "--impose", "2:4", "--kernels", "dense,torch-csr", "--max-seconds", "0.05")
    assert code == 0 and "compiled for torch" in out and "2:4" in out
    code, out, _ = run(capsys, "bench", f"{f}:make", "--impose", "unstructured:0.9", "--kernels", "dense,torch-csr", "--runs", "5", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["eager_ms"] > 0 and result["compiled_ms"] > 0 and result["layers"] == 2


def test_demo_prints_the_tables(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "cache"))
    f = write_factory(tmp_path, """
        import torch
        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)), (torch.randn(1, 256),)
    """)
    code, out, _ = run(capsys, "demo", "--model", f"{f}:make", "--impose", "unstructured:0.9")
    assert code == 0
    assert "dense vs unstructured:0.9 (weight storage)" in out and "compiled for torch" in out
    # which layers run sparse is measured (a busy machine may keep them dense): both outcomes are reported
    assert ("end to end on the example inputs" in out or "no layer runs sparse" in out) and "verify: ok" in out


def test_tune_fills_the_cache_that_compile_reuses(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "cache"))
    f = write_factory(tmp_path, """
        import torch
        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)), (torch.randn(1, 64),)
    """)
    code, out, _ = run(capsys, "tune", f"{f}:make", "--impose", "unstructured:0.9", "--max-seconds", "0.02", "--json")
    assert code == 0
    tuned = {r["layer"]: r["kernel"] for r in json.loads(out)["layers"]}
    assert (tmp_path / "cache" / "decisions" / "torch.json").exists()
    code, out, _ = run(capsys, "compile", f"{f}:make", "--impose", "unstructured:0.9", "--max-seconds", "0.02", "--json")
    report = json.loads(out)
    assert code == 0 and report["cache"]["hit"] == 2
    assert {r["layer"]: r["kernel"] for r in report["layers"]} == tuned


# --- usage errors (typer >= 0.29 vendors click: its exceptions are not click's), numeric ranges, output paths ---

@pytest.mark.parametrize("argv,needle", [
    (["analyze"], "Missing argument 'MODEL'"),
    (["analyze", "zoo:mlp-relu", "--nope"], "No such option: --nope"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["analyze", "zoo:mlp-relu", "--calib", "abc"], "'--calib'"),
    (["bench", "zoo:mlp-relu", "--runs", "abc"], "'--runs'"),
    (["compile", "zoo:mlp-relu", "--max-seconds", "abc"], "'--max-seconds'"),
    (["opt", "zoo:mlp-relu"], "'--pipeline'"),
    # numbers out of range: rejected while parsing, before any work (were a StatisticsError / silently accepted)
    (["bench", "zoo:mlp-relu", "--runs", "0"], "'--runs'"),
    (["bench", "zoo:mlp-relu", "--runs", "-1"], "'--runs'"),
    (["analyze", "zoo:mlp-relu", "--calib", "-1"], "'--calib'"),
    (["opt", "zoo:mlp-relu", "-p", "analyze-weights", "--calib", "-1"], "'--calib'"),
    (["sparsify", "zoo:mlp-relu", "--calib", "-1"], "'--calib'"),
    (["sparsify", "zoo:mlp-relu", "--refine", "-1"], "'--refine'"),
    (["compile", "zoo:mlp-relu", "--max-seconds", "-1"], "'--max-seconds'"),
    (["compile", "zoo:mlp-relu", "--max-seconds", "0"], "'--max-seconds'"),
    (["compile", "zoo:mlp-relu", "--max-seconds", "nan"], "'--max-seconds'"),
    (["tune", "zoo:mlp-relu", "--max-seconds", "inf"], "'--max-seconds'"),
])
def test_usage_errors_exit_2_with_clicks_message(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err + out
    assert "Usage: sparsecomp" in err and "Error: " in err and needle in err


def test_usage_error_with_debug_is_still_a_usage_error(capsys):
    code, _, err = run(capsys, "bench", "zoo:mlp-relu", "--runs", "0", "--debug")
    assert code == 2 and "'--runs'" in err and "Traceback" not in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "analyze", "--help")
    assert code == 0 and "--calib" in out


BOOM = """
    import torch
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)), (torch.randn(2, 8),)
    def boom():
        raise RuntimeError("factory exploded")
"""


@pytest.mark.parametrize("where,needle", [
    ("nodir/x.pt", "does not exist"),
    (".", "is a directory"),
    ("afile/x.pt", "is not a directory"),
])
def test_sparsify_output_path_checked_before_any_work(capsys, tmp_path, where, needle):
    f = write_factory(tmp_path, BOOM)
    (tmp_path / "afile").write_text("x")
    target = str(tmp_path / where)
    # :boom raises when loaded, so reaching the -o error proves the check runs first
    code, out, err = run(capsys, "sparsify", f"{f}:boom", "--method", "magnitude", "-o", target)
    assert code == 2 and "internal error" not in err and "factory exploded" not in err
    assert err.startswith("error: ") and "-o" in err and needle in err and target.rstrip("/.") in err
    assert not list((tmp_path / "afile").parent.glob("**/*.tmp"))


def test_sparsify_output_still_saves(capsys, tmp_path):
    f = write_factory(tmp_path, BOOM)
    code, out, err = run(capsys, "sparsify", f"{f}:make", "--method", "magnitude", "-o", str(tmp_path / "w.pt"), "--json")
    assert code == 0, err
    assert json.loads(out)["output"] == str(tmp_path / "w.pt") and (tmp_path / "w.pt").is_file()


@pytest.mark.parametrize("where,needle", [
    ("afile", "exists and is not a directory"),
    ("afile/sub", "is not a directory"),
    ("/proc/sparsecomp-dump", "'/proc/sparsecomp-dump'"),  # read-only, or (root) permitted yet creating it fails
])
def test_opt_dump_dir_checked_before_any_work(capsys, tmp_path, where, needle):
    f = write_factory(tmp_path, BOOM)
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "opt", f"{f}:boom", "-p", "analyze-weights", "--dump-dir", str(tmp_path / where))
    assert code == 2 and "internal error" not in err and "factory exploded" not in err
    assert err.startswith("error: ") and "--dump-dir" in err and needle in err and ("afile" in err or "/proc" in err)
    assert (tmp_path / "afile").read_text() == "x"


def test_weights_shape_mismatch_names_the_parameters(capsys, tmp_path):
    f = write_factory(tmp_path, BOOM)
    torch.save(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).state_dict(),
               tmp_path / "shape.pt")
    code, _, err = run(capsys, "analyze", f"{f}:make", "--weights", str(tmp_path / "shape.pt"))
    assert code == 2 and "internal error" not in err
    assert "0.weight" in err and "[32, 8]" in err and "[16, 8]" in err


def test_module_docstring_lists_every_command():
    import typer.main

    import sparsecomp.cli as cli

    commands = typer.main.get_command(cli.app).commands
    assert len(commands) >= 8
    for name in commands:
        assert f"sparsecomp {name}" in cli.__doc__, name


@pytest.mark.parametrize("argv,needle", [
    # options that do not apply, or that name nothing, are errors, checked before the model loads (:boom raises when loaded)
    (["sparsify", "{f}:boom", "--method", "magnitude", "--refine", "5"], "--refine: SparseGPT options, and --method is magnitude"),
    (["sparsify", "{f}:boom", "--method", "wanda", "--damp", "0.1", "--correct"], "--damp, --correct: SparseGPT options"),
    (["sparsify", "{f}:boom", "--method", "bogus"], "unknown sparsify method 'bogus'"),
    (["sparsify", "{f}:boom", "--method", "magnitude", "--pattern", "3:2"], "bad weight pattern '3:2'"),
    (["tune", "{f}:boom", "--backend", "bogus"], "unknown backend 'bogus'"),
    (["bench", "{f}:boom", "--backend", "tvm"], "backend 'tvm' is not yet available"),
    (["compile", "{f}:boom", "--backend", "ort", "-o", "{tmp}/model.bin"], "-o {tmp}/model.bin: the ONNX file's name must end in .onnx"),
    (["demo", "--model", "{f}:boom", "--impose", "3:2"], "bad weight pattern '3:2'"),
    (["opt", "{f}:boom", "-p", "analyze-weights", "--print-ir-after", "nope"], "--print-ir-after nope: unknown pass 'nope'"),
    # after loading: an empty pattern is not "no pattern" (an unset shell variable), a folder is not a state dict
    (["analyze", "{f}:make", "--impose", ""], "--impose: empty pattern"),
    (["analyze", "{f}:make", "--weights", "{tmp}"], "--weights: '{tmp}' is a directory"),
])
def test_options_that_do_not_apply_are_errors_before_any_work(capsys, tmp_path, argv, needle):
    f = write_factory(tmp_path, BOOM)
    argv = [a.format(f=f, tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and "internal error" not in err and "factory exploded" not in err, err
    assert err.startswith("error: ") and needle.format(tmp=tmp_path) in err, err


def test_every_command_checks_the_thread_setting(capsys, tmp_path, monkeypatch):
    """SPARSECOMP_NUM_THREADS is checked by every command (analyze and sparsify took any value),
    and applied to torch there."""
    import sparsecomp.threads as threads

    f = write_factory(tmp_path, BOOM)
    monkeypatch.setattr(threads, "_applied_to_torch", None)  # (whatever an earlier test gave torch)
    monkeypatch.setenv("SPARSECOMP_NUM_THREADS", "abc")
    code, _, err = run(capsys, "analyze", f"{f}:make")
    assert code == 2 and "SPARSECOMP_NUM_THREADS='abc' is not an integer" in err
    before = torch.get_num_threads()
    monkeypatch.setenv("SPARSECOMP_NUM_THREADS", "1")
    try:
        code, _, err = run(capsys, "analyze", f"{f}:make")
        assert code == 0 and torch.get_num_threads() == 1, err
    finally:
        torch.set_num_threads(before)


def test_opt_with_nothing_to_show_says_what_ran(capsys, tmp_path):
    f = write_factory(tmp_path, BOOM)
    code, out, err = run(capsys, "opt", f"{f}:make", "-p", "analyze-weights,find-mlps")
    assert code == 0 and "ran analyze-weights,find-mlps on" in out and "--print-ir-after-all" in err


def test_output_that_cannot_be_written_is_not_an_internal_error(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    env = dict(os.environ, SPARSECOMP_CACHE_DIR=str(tmp_path / "cache"))
    with open("/dev/full", "w") as full:
        res = subprocess.run([str(VENV_BIN / "sparsecomp"), "passes"], stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert res.returncode == 1 and "cannot write the output: No space left on device" in res.stderr, res.stderr
    assert "internal error" not in res.stderr and "Traceback" not in res.stderr


def test_an_onnx_file_name_in_capitals_is_read_as_onnx(tmp_path):
    from sparsecomp.loader import load_model

    (tmp_path / "M.ONNX").write_bytes(b"not onnx")
    with pytest.raises(Exception) as info:
        load_model(str(tmp_path / "M.ONNX"))
    assert "cannot read MODEL" not in str(info.value)  # the ONNX reader's own complaint, not "not a MODEL spelling"


def test_zoo_lists_every_model(capsys):
    from sparsecomp import models

    code, out, _ = run(capsys, "zoo", "--json")
    listed = json.loads(out)
    assert code == 0 and [e["name"] for e in listed] == models.names()
    assert listed[0]["inputs"] == models.info(listed[0]["name"]).inputs and "hidden" in listed[0]["config"]
    code, out, _ = run(capsys, "zoo")
    assert code == 0 and all(n in out for n in models.names()) and "[batch, hidden]" in out  # shapes are not eaten as markup
