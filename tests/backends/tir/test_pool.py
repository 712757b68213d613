"""Where TIR kernels run their parallel loops (`sparsecomp.backends.tir._pool`): on torch's OpenMP
threads by default, on TVM's own pool when asked (SPARSECOMP_TIR_POOL=tvm) or when the launch shim
cannot be built; the results are the same either way, and the compile report says which."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("tvm")

import torch  # noqa: E402

from sparsecomp.patterns import impose_pattern  # noqa: E402


@pytest.fixture
def tir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "cache"))
    from sparsecomp.backends import tir as mod

    if not mod.available():
        pytest.skip("TVM does not import")
    return mod


def _openmp_or_skip():
    from sparsecomp.backends.tir import _pool

    if not _pool.uses_openmp():
        pytest.skip(f"kernels stay on TVM's pool here: {_pool.status()}")
    return _pool


def _sparse_weight(n=300, k=260, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w = impose_pattern(w, "unstructured:0.9")
    w[7] = 0  # an all-zero row
    return w


def _check(lin, w, b, m):
    x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m))
    ref = x @ w.T + b
    y = lin(x, b)
    assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert not torch.allclose(y, ref + 1e-2)  # a wrong answer would not pass the check above


def test_kernel_loops_run_on_torch_openmp_threads(tir):
    pool = _openmp_or_skip()
    w, b = _sparse_weight(), torch.randn(300)
    lin = tir.make_linear("csr", w)
    _check(lin, w, b, 1)
    _check(lin, w, b, 37)
    path = lin.kernel.path
    assert path is not None and path in pool._attached
    # the module's launch pointer is the shim's, not TVM's runtime function
    launch = ctypes.c_void_p.in_dll(ctypes.CDLL(path), "__TVMBackendParallelLaunch").value
    assert launch == pool._addr(pool._loaded, "sc_parallel_launch")
    assert "torch's OpenMP threads" in pool.status() and tir.pool_tag() == "openmp"


def test_team_size_follows_set_threads(tir):
    pool = _openmp_or_skip()
    w, b = _sparse_weight(seed=1), torch.randn(300)
    lin = tir.make_linear("csr", w)
    try:
        for n in (1, 2, 3):  # 3: more tasks than this CI's cores is still correct
            pool.set_threads(n)
            _check(lin, w, b, 1)
            _check(lin, w, b, 19)
    finally:
        pool.set_threads(None)


def test_attach_refuses_what_it_cannot_point(tir):
    from sparsecomp.backends.tir import _pool

    assert _pool.attach(None) is False  # a kernel held in memory only: TVM's pool
    assert "held in memory" in _pool.status() or not _pool.uses_openmp()


_CHILD = textwrap.dedent("""
    import torch, sparsecomp as sc
    from torch import nn
    from sparsecomp.backends.tir import pool_status, pool_tag
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    with torch.no_grad():
        model[0].bias -= 0.6
    x = torch.randn(1, 64)
    cm = sc.compile(model, (x,), activation_sparsity="exact", kernels="tir-up+serial-down", max_seconds_per_layer=0.05)
    y = sc.api.CompiledModel(cm.gm, cm.report, "torch")(x)
    assert (y - model(x)).abs().max() <= 1e-4 * model(x).abs().max()
    print(pool_tag())
    print(pool_status())
    print(any("TVM's thread pool" in n for n in cm.report.notes))
""")


@pytest.mark.parametrize("env,why", [({"SPARSECOMP_TIR_POOL": "tvm"}, "SPARSECOMP_TIR_POOL=tvm"),
                                     ({"CC": "/bin/false"}, "shim is unavailable")], ids=["asked", "no-compiler"])
def test_tvm_pool_fallback(env, why, tmp_path):
    """On TVM's pool the kernels give the same results, the serial-down candidates come back
    (`backends/torch/mlp.py`), and the report says where the kernels ran and why."""
    full = {**os.environ, "SPARSECOMP_CACHE_DIR": str(tmp_path / "cache"), **env}
    if "CC" in env:
        full.pop("SPARSECOMP_TIR_POOL", None)
    res = subprocess.run([sys.executable, "-c", _CHILD], env=full, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    tag, status, noted = res.stdout.strip().splitlines()[-3:]
    assert tag == "tvm" and why in status and noted == "True"


def test_unknown_pool_setting_is_a_clear_error(tmp_path):
    env = {**os.environ, "SPARSECOMP_CACHE_DIR": str(tmp_path / "cache"), "SPARSECOMP_TIR_POOL": "gomp"}
    code = ("import torch, sparsecomp as sc\n"
            "from sparsecomp.backends import tir\n"
            "try:\n    tir.make_linear('csr', torch.eye(64))\nexcept sc.SparsecompError as e:\n    print('ERR', e)\n"
            "try:\n    sc.compile(torch.nn.Linear(64, 64), (torch.randn(1, 64),))\nexcept sc.SparsecompError as e:\n    print('ERR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("ERR SPARSECOMP_TIR_POOL must be 'openmp' or 'tvm', got 'gomp'") == 2  # kernel and compile


def test_default_team_size_is_the_sparsecomp_setting_first(monkeypatch):
    """With no explicit count, the kernels' team size is SPARSECOMP_NUM_THREADS (sparsecomp's one
    setting), then TVM_NUM_THREADS, then every CPU: a TVM_NUM_THREADS left in the environment
    for other TVM work does not override sparsecomp's own setting."""
    from sparsecomp.backends.tir import _pool

    calls = []

    class Shim:  # records what the loaded shim would be told
        def sc_set_threads(self, n):
            calls.append(n.value)

    monkeypatch.setattr(_pool, "_loaded", Shim())
    monkeypatch.setattr(_pool, "_threads", None)
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    monkeypatch.setenv("SPARSECOMP_NUM_THREADS", "1")
    _pool.set_threads(None)
    monkeypatch.delenv("SPARSECOMP_NUM_THREADS")
    _pool.set_threads(None)
    monkeypatch.delenv("TVM_NUM_THREADS")
    _pool.set_threads(None)
    from sparsecomp.backends.tir._target import _affinity_cpus

    assert calls == [1, 3, _affinity_cpus()]
