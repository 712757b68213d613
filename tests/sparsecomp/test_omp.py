"""torch's OpenMP spin count, set at `import sparsecomp` before torch loads where the TIR kernels will run
on TVM's own pool, left alone where they run on torch's threads (sparsecomp/omp.py)."""

import os
import subprocess
import sys

import pytest


def _probe(code: str, **env) -> list[str]:
    """Run `code` in a fresh interpreter (libgomp reads its variables once per process)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[:-1]


READ = "import os; print(os.environ.get('GOMP_SPINCOUNT')); print(sparsecomp.omp.spin_note() is not None)"


def test_sparsecomp_first_sets_the_spin_count_before_torch_loads_for_tvms_pool():
    # the kernels on TVM's own pool: torch's workers must not spin on the cores its workers need
    assert _probe("import sparsecomp, torch; " + READ, SPARSECOMP_TIR_POOL="tvm") == ["10000", "False"]


def test_kernels_on_torchs_threads_leave_its_spin_alone():
    from sparsecomp import omp

    if not omp.openmp_pool_expected():
        pytest.skip("no C compiler or not Linux: the kernels would run on TVM's pool here")
    assert _probe("import sparsecomp, torch; " + READ) == ["None", "False"]
    assert _probe("import sparsecomp, torch; " + READ, SPARSECOMP_TIR_POOL="openmp") == ["None", "False"]


def test_torch_first_keeps_its_default_and_compile_will_say_so():
    assert _probe("import torch, sparsecomp; " + READ) == ["None", "True"]


@pytest.mark.parametrize("var,value", [("GOMP_SPINCOUNT", "500"), ("OMP_WAIT_POLICY", "PASSIVE")])
@pytest.mark.parametrize("order", ["sparsecomp, torch", "torch, sparsecomp"])
def test_a_users_own_setting_is_kept_and_no_note(var, value, order):
    code = (f"import {order}, os; print(os.environ.get('GOMP_SPINCOUNT')); print(os.environ.get('OMP_WAIT_POLICY')); "
            "print(sparsecomp.omp.spin_note() is not None)")
    spin, policy, note = _probe(code, **{var: value})
    assert (spin, policy) == ((value, "None") if var == "GOMP_SPINCOUNT" else ("None", value))
    assert note == "False"


def test_compile_report_carries_the_note_only_when_sparse_kernels_run(tmp_path, monkeypatch):
    import torch
    import torch.nn as nn

    import sparsecomp as sc
    from sparsecomp import omp, patterns

    monkeypatch.setattr(omp, "_default_spin", True)
    monkeypatch.setattr(omp, "_torch_first", True)
    monkeypatch.setattr("sparsecomp.backends.tir.pool_tag", lambda: "tvm")  # the note is about TVM's pool
    torch.manual_seed(0)
    sparse = nn.Sequential(nn.Linear(256, 256)).eval()
    patterns.impose(sparse, "unstructured:0.95")
    x = torch.randn(1, 256)
    cm = sc.compile(sparse, (x,), kernels="torch-csr", cache_dir=str(tmp_path / "s"), max_seconds_per_layer=0.02)
    assert cm.report.rows[0]["decision"] == "sparse"
    assert omp.spin_note() in cm.report.notes
    dense = sc.compile(nn.Sequential(nn.Linear(256, 256)).eval(), (x,), cache_dir=str(tmp_path / "d"),
                       max_seconds_per_layer=0.02)
    assert omp.spin_note() not in dense.report.notes  # no sparse kernel, nothing to contend with
    monkeypatch.setattr("sparsecomp.backends.tir.pool_tag", lambda: "openmp")  # one pool: nothing to contend with
    on_torch_threads = sc.compile(sparse, (x,), kernels="torch-csr", cache_dir=str(tmp_path / "o"), max_seconds_per_layer=0.02)
    assert omp.spin_note() not in on_torch_threads.report.notes
    monkeypatch.setattr(omp, "_default_spin", False)
    again = sc.compile(sparse, (x,), kernels="torch-csr", cache_dir=str(tmp_path / "s"), max_seconds_per_layer=0.02)
    assert not [n for n in again.report.notes if "GOMP_SPINCOUNT" in n]
