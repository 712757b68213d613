"""find-mlps: plain and gated regions, activation kinds, and regions that must NOT match."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsecomp.frontend import capture
from sparsecomp.pass_manager import PassContext, PassManager


def regions(model, x):
    gm = capture(model.eval(), (x,))
    ctx = PassContext.create((x,))
    PassManager("find-mlps").run(gm, ctx)
    return gm, ctx.results["find-mlps"]


class Plain(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.up, self.down, self.act = nn.Linear(16, 64), nn.Linear(64, 16), act

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 48), nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("act,kind,family", [
    (nn.ReLU(), "relu", "relu"),
    (nn.ReLU6(), "relu6", "relu"),
    (nn.GELU(), "gelu", "gelu"),
    (nn.GELU(approximate="tanh"), "gelu_tanh", "gelu"),
    (nn.SiLU(), "silu", "silu"),
    (lambda t: torch.relu(t) ** 2, "relu2", "relu"),
    (lambda t: torch.square(torch.relu(t)), "relu2", "relu"),
])
def test_plain_activation_kinds(act, kind, family):
    gm, found = regions(Plain(act), torch.randn(3, 16))
    assert len(found) == 1
    r = found[0]
    assert (r.pattern, r.activation, r.family, r.up, r.down, r.hidden) == ("plain", kind, family, "up", "down", 64)
    roles = sorted(n.meta["sparsecomp.mlp"]["role"] for n in gm.graph.nodes if "sparsecomp.mlp" in n.meta)
    assert roles == sorted(["up", "act", "down"] + (["act"] if kind == "relu2" and False else []))


def test_gated():
    gm, found = regions(Gated(), torch.randn(2, 5, 16))
    assert len(found) == 1
    r = found[0]
    assert (r.pattern, r.activation, r.gate, r.up, r.down, r.hidden, r.exact_zeros) == ("gated", "silu", "gate", "up", "down", 48, False)
    assert len(r.nodes) == 5


def test_must_not_match():
    class Escapes(Plain):  # hidden activation also used elsewhere: skipping neurons would be wrong
        def forward(self, x):
            h = self.act(self.up(x))
            return self.down(h), h.sum()

    class NoAct(Plain):  # two linears with nothing between them are not an MLP
        def forward(self, x):
            return self.down(self.up(x))

    class Tanh(Plain):  # unknown activation
        def forward(self, x):
            return self.down(torch.tanh(self.up(x)))

    class GateInputsDiffer(Gated):
        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x + 1))

    class Convs(nn.Module):  # conv -> relu -> conv: channels, not the rows sparse-mlp skips
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Conv2d(16, 64, 1), nn.Conv2d(64, 16, 1)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    for model, x in [(Escapes(nn.ReLU()), torch.randn(2, 16)), (NoAct(None), torch.randn(2, 16)),
                     (Tanh(None), torch.randn(2, 16)), (GateInputsDiffer(), torch.randn(2, 16)),
                     (Convs(), torch.randn(1, 16, 4, 4))]:
        _, found = regions(model, x)
        assert found == [], type(model).__name__


def test_zoo_counts():
    from sparsecomp.models import get

    for name, overrides, n, pattern, act in [("llama-tiny", {"layers": 2}, 2, "gated", "silu"),
                                              ("bert-tiny", {}, 2, "plain", "gelu"),
                                              ("opt-125m-like", {"layers": 2, "hidden": 64, "ffn": 128, "heads": 2}, 2, "plain", "relu")]:
        model, ex = get(name, **overrides)
        gm = capture(model, ex)
        ctx = PassContext.create(ex)
        PassManager("find-mlps").run(gm, ctx)
        found = ctx.results["find-mlps"]
        assert len(found) == n and all(r.pattern == pattern and r.activation == act for r in found), name
