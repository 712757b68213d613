"""The face: `sparsecomp sparsify ... -o` then `--weights` round trip, and `compile(sparsify=...)`."""

import json
import textwrap

import torch

import sparsecomp as sc
from sparsecomp import patterns
from sparsecomp.cli import main

from .test_methods import Tiny, calib

FACTORY = """
    import torch
    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))
        return m, (torch.randn(8, 64),)
"""


def run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def factory(tmp_path):
    f = tmp_path / "net.py"
    f.write_text(textwrap.dedent(FACTORY))
    return f"{f}:make"


def test_cli_sparsify_then_weights_round_trip(capsys, tmp_path):
    model, pruned = factory(tmp_path), tmp_path / "pruned.pt"
    code, out, err = run(capsys, "sparsify", model, "--method", "sparsegpt", "--pattern", "2:4", "--calib", "4",
                         "-o", str(pruned), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["spec"] == "sparsegpt:2:4" and report["sparsity"] == 0.5 and report["output"] == str(pruned)
    state = torch.load(pruned, weights_only=True)
    assert patterns.nm_conformance(state["0.weight"], 2, 4) == 1.0
    # every command takes --weights: analyze agrees with what sparsify reported
    code, out, _ = run(capsys, "analyze", model, "--weights", str(pruned), "--json")
    assert code == 0
    layers = {layer["name"]: layer for layer in json.loads(out)["layers"]}
    assert all(layer["nm_conformance"]["2:4"] == 1.0 and layer["density"] == 0.5 for layer in layers.values())


def test_cli_sparsify_table_and_unstructured(capsys, tmp_path):
    code, out, _ = run(capsys, "sparsify", factory(tmp_path), "--method", "magnitude", "--pattern", "unstructured",
                       "--sparsity", "0.7", "--skip", "2")
    assert code == 0
    assert "magnitude:unstructured:0.7" in out and "skipped by '2'" in out and "nothing saved" in out
    code, out, _ = run(capsys, "sparsify", factory(tmp_path), "--method", "wanda:unstructured:0.5", "--allocation", "owl", "--json")
    assert code == 0 and json.loads(out)["sparsity"] == 0.5


def test_cli_sparsify_bad_input(capsys, tmp_path):
    for argv, needle in [
        (["--method", "sparsegpt:2:4", "--pattern", "2:4"], "already names its pattern"),
        (["--method", "sparsegpt:3:3"], "bad sparsify spec"),
        (["--method", "obs"], "unknown sparsify method"),
        (["--allocation", "best"], "unknown allocation"),
    ]:
        code, _, err = run(capsys, "sparsify", factory(tmp_path), *argv)
        assert code == 2 and needle in err and "Traceback" not in err, (argv, err)


def test_compile_with_sparsify_notes_the_lossy_step(tmp_path):
    m, cal = Tiny(), calib(2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cm = sc.compile(m, cal[0], sparsify="sparsegpt:unstructured:0.9", calibration=cal, kernels="dense,torch-csr",
                    cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # the user's model is untouched
    assert any(n.startswith("lossy (asked for): sparsify sparsegpt:unstructured:0.9") for n in cm.report.notes)
    rows = {r["layer"]: r for r in cm.report.rows}
    assert abs(rows["fc1"]["density"] - 0.1) < 1e-3 and rows["head"]["density"] == 1.0
    assert cm.report.verify["ok"]
    assert torch.isfinite(cm(*cal[0])).all()


def test_cli_compile_sparsify(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = run(capsys, "compile", factory(tmp_path), "--sparsify", "wanda:unstructured:0.9", "--kernels", "dense,torch-csr",
                         "--max-seconds", "0.05", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert any("lossy (asked for): sparsify wanda:unstructured:0.9" in n for n in report["notes"])


def test_compile_with_sparsify_notes_the_output_error(tmp_path):
    # the per-layer errors of the report were dropped from compile's note
    cal = calib(2)
    cm = sc.compile(Tiny(), cal[0], sparsify="wanda:unstructured:0.5", calibration=cal, kernels="dense",
                    cache_dir=str(tmp_path), max_seconds_per_layer=0.01)
    note = next(n for n in cm.report.notes if n.startswith("lossy (asked for): sparsify wanda"))
    assert "layer output error mean" in note and "max" in note
