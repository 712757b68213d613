"""sparsecomp.callpath: trimming the per-call path of a lowered GraphModule changes no result."""

import torch
import torch.nn as nn

import sparsecomp as sc
from sparsecomp.api import CompiledModel
from sparsecomp.callpath import bind_attribute_paths


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.register_buffer("shift", torch.full((5,), 0.5))

    def forward(self, x):
        return self.lin(x) + self.shift


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Inner(), Inner()])
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        y = self.blocks[0](x)
        return self.blocks[1](torch.cat([y, x[:, :1]], 1)) * self.scale


def traced():
    torch.manual_seed(0)
    m = Outer()
    return m, torch.fx.symbolic_trace(m)  # call_module nodes and get_attr reads (scale, the buffers)


def test_bound_paths_read_the_same_objects_and_follow_reassignment():
    m, gm = traced()
    x = torch.randn(4, 6)
    ref = m(x)
    added = bind_attribute_paths(gm)
    assert added > 0
    assert gm.__dict__["blocks"] is gm._modules["blocks"] and "scale" in gm.__dict__
    assert "shift" not in getattr(gm.blocks, "0").__dict__  # buffers stay on nn.Module's lookup
    assert torch.equal(gm(x), ref)
    assert bind_attribute_paths(gm) == 0  # idempotent
    # a parameter or module assigned again is the one read (nn.Module.__setattr__ drops the entry)
    gm.scale = nn.Parameter(torch.tensor(3.0))
    assert torch.allclose(gm(x), ref * 1.5)
    with torch.no_grad():
        before = gm(x)
        inner = getattr(gm.blocks, "1")
        inner.lin = nn.Linear(6, 5)
        assert not torch.allclose(gm(x), before)
        before = gm(x)
        inner.shift = torch.zeros(5)  # a buffer assigned again, likewise
        assert torch.allclose(gm(x), before - 0.5 * 3.0)


def test_compiled_model_calls_its_own_hooks_and_binds_the_graph(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(2, 16)
    cm = sc.compile(m, (x,), cache_dir=str(tmp_path))
    lowered = CompiledModel(cm.gm, cm.report, "torch")
    assert any(isinstance(v, nn.Module) for v in lowered.gm.__dict__.values())  # bound paths
    seen = []
    h = lowered.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    try:
        y = lowered(x)
    finally:
        h.remove()
    assert seen == [torch.Size([2, 8])] and torch.allclose(y, m(x), atol=1e-5)
    lowered(x)
    assert len(seen) == 1
