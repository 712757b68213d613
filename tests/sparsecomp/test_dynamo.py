"""`torch.compile(model, backend="sparsecomp")`: the registered backend (sparsecomp/dynamo.py)."""

import logging

import pytest
import torch
import torch.nn as nn

from sparsecomp.patterns import impose


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 32)).eval()
    impose(m, "unstructured:0.9")
    return m


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_backend_is_registered_by_entry_point():
    assert "sparsecomp" in torch._dynamo.list_backends(exclude_tags=())


def test_compiled_matches_eager_and_rewrites_the_sparse_layers(caplog):
    m = _model()
    # one candidate kernel: the layers run sparse whatever the timing on a busy machine says
    f = torch.compile(m, backend="sparsecomp", options={"max_seconds_per_layer": 0.05, "kernels": "torch-csr"})
    x = torch.randn(4, 64)
    with caplog.at_level(logging.INFO, logger="sparsecomp.dynamo"), torch.no_grad():
        y = f(x)
    ref = m(x)
    assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert any("2 of 2 layers sparse" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("batches", [(4, 7, 1), (1, 16)])
def test_batch_changes_stay_correct(batches):
    m = _model(1)
    f = torch.compile(m, backend="sparsecomp", options={"max_seconds_per_layer": 0.05})
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, 64)
            ref = m(x)
            assert (f(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_a_weight_changed_in_place_is_never_used_stale(caplog):
    m = _model(2)
    f = torch.compile(m, backend="sparsecomp", options={"max_seconds_per_layer": 0.05})
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = f(x).clone()
        m[2].weight.mul_(-3.0)  # what an optimizer step does: in place, same tensor object
        with caplog.at_level(logging.INFO, logger="sparsecomp.dynamo"):
            after = f(x)
        ref = m(x)
    assert not torch.allclose(after, before)  # the old (frozen) weights must NOT be what runs
    assert (after - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert any("compiling again" in r.getMessage() for r in caplog.records)


def test_unknown_option_is_a_clear_error():
    f = torch.compile(_model(), backend="sparsecomp", options={"max_secs": 1})
    with pytest.raises(Exception, match="unknown torch.compile option.*max_secs"):
        f(torch.randn(2, 64))
