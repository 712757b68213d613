"""`torch.compile(model, backend="sparsecomp")`: the registered backend (sparsecomp/dynamo.py)."""

import logging
import warnings

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
    assert any("has not seen (another instance, or changed); compiling" in r.getMessage() for r in caplog.records)


def test_unknown_option_is_a_clear_error():
    f = torch.compile(_model(), backend="sparsecomp", options={"max_secs": 1})
    with pytest.raises(Exception, match="unknown torch.compile option.*max_secs"):
        f(torch.randn(2, 64))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x):
        h = torch.relu(self.up(x))
        torch._dynamo.graph_break()  # two graphs per block; dynamo reuses each for both blocks
        return self.down(h)


def test_instances_sharing_a_graph_compile_once_each(monkeypatch):
    """dynamo hands both blocks' calls to one graph (their weights are its inputs): one compiled
    model per block, kept, instead of a recompile on every alternate call."""
    import sparsecomp.api as api

    torch.manual_seed(0)
    net = nn.Sequential(_Block(), _Block()).eval()
    impose(net, "unstructured:0.9")
    compiles = []
    real = api.compile
    monkeypatch.setattr(api, "compile", lambda *a, **k: compiles.append(1) or real(*a, **k))
    f = torch.compile(net, backend="sparsecomp", options={"max_seconds_per_layer": 0.05})
    x = torch.randn(2, 64)
    with torch.no_grad():
        for _ in range(3):
            ref = net(x)
            assert (f(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert len(compiles) == 4  # 2 graphs x 2 blocks, on the first call only


def test_modes(monkeypatch):
    import sparsecomp.dynamo as dynamo

    seen = []
    real = dynamo._Runner.__init__
    monkeypatch.setattr(dynamo._Runner, "__init__", lambda self, gm, ex, options: seen.append(options) or real(self, gm, ex, options))
    m = _model(3)
    with torch.no_grad():
        torch.compile(m, backend="sparsecomp", mode="max-autotune")(torch.randn(2, 64))
    assert seen[-1].get("tune") is True  # sparsecomp's search of every kernel variant
    with pytest.raises(Exception, match="unknown torch.compile mode 'fastest'"):
        dynamo.backend(torch.fx.symbolic_trace(m), [torch.randn(2, 64)], mode="fastest")


def test_training_use_warns_that_frozen_weights_get_no_gradients():
    m = _model(4)
    f = torch.compile(m, backend="sparsecomp", options={"max_seconds_per_layer": 0.05})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        f(torch.randn(2, 64))  # inference: silent
    torch._dynamo.reset()
    f = torch.compile(m, backend="sparsecomp", options={"max_seconds_per_layer": 0.05})
    with pytest.warns(UserWarning, match="is for inference: the model's weights are frozen"):
        f(torch.randn(2, 64))
