"""The CLI around the ORT backend: `compile --backend ort -o`, then `analyze` and `bench` on the file."""

import json
import textwrap

import onnx
from sparsecomp.backends.ort import files

from sparsecomp.cli import main

FACTORY = textwrap.dedent("""
    import torch, torch.nn as nn

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
        return m, (torch.randn(2, 64),)
""")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_compile_writes_onnx_then_analyze_and_bench(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "cache"))
    factory = tmp_path / "f.py"
    factory.write_text(FACTORY)
    out = tmp_path / "m.onnx"
    code, stdout, stderr = run(capsys, "compile", f"{factory}:make", "--impose", "unstructured:0.9", "--backend", "ort",
                               "-o", out, "--kernels", "dense,sell4", "--max-seconds", "0.05")
    assert code == 0, stderr
    assert "compiled for ort" in stdout and f"wrote {out}" in stderr
    onnx.checker.check_model(str(out), full_check=True)
    assert [r["layer"] for r in files.layers(onnx.load(str(out)))] == ["0", "2"]

    code, stdout, _ = run(capsys, "analyze", out, "--json")
    assert code == 0
    layers = {l["name"]: l for l in json.loads(stdout)["layers"]}
    assert set(layers) == {"0", "2"} and all(abs(l["density"] - 0.1) < 0.01 for l in layers.values())

    code, stdout, _ = run(capsys, "bench", out, "--runs", "3", "--json")
    assert code == 0
    res = json.loads(stdout)
    assert res["backend"] == "ort" and res["dense_equivalent_ms"] > 0 and res["sparsecomp_ms"] > 0 and res["layers"] == 2

    plain = tmp_path / "plain.onnx"  # any other ONNX file is timed alone
    onnx.save(files.dense_equivalent(onnx.load(str(out))), str(plain))
    code, stdout, _ = run(capsys, "bench", plain, "--runs", "2")
    assert code == 0 and "not a sparsecomp export" in stdout


def test_output_errors_before_any_work(capsys, tmp_path, monkeypatch):
    import sparsecomp.loader

    monkeypatch.setattr(sparsecomp.loader, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    code, _, err = run(capsys, "compile", "zoo:mlp-relu", "-o", tmp_path / "x.onnx")
    assert code == 2 and "backend 'torch' does not produce" in err and "--backend ort" in err
    code, _, err = run(capsys, "compile", "zoo:mlp-relu", "--backend", "ort", "-o", tmp_path / "nope" / "x.onnx")
    assert code == 2 and "does not exist" in err
