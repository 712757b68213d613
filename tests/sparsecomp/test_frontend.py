"""Capture: ATen-level GraphModule, parameters as attributes, dynamic dims, clear errors."""

import pytest
import torch
import torch.nn as nn

from sparsecomp.frontend import capture
from sparsecomp.errors import CaptureError
from sparsecomp.ir import compare_outputs, linear_sites


class Tok(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.emb(input_ids)) * attention_mask.unsqueeze(-1)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return self.inner(x)


class Inner(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch
            return x
        return -x


def test_params_are_attributes_and_aten_ops():
    m = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval()
    gm = capture(m, (torch.randn(3, 8),))
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"0.weight", "0.bias"} <= targets
    assert any(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
    assert [s.name for s in linear_sites(gm)] == ["0"]


@pytest.mark.parametrize("batch", [1, 4])
def test_batch_and_seq_dynamic_even_from_size_one_examples(batch):
    torch.manual_seed(0)
    m = Tok().eval()
    ex = {"input_ids": torch.randint(0, 50, (batch, 1)), "attention_mask": torch.ones(batch, 1)}
    gm = capture(m, ex)
    info = gm.meta["sparsecomp.capture"]
    assert info.dynamic == {"input_ids": [0, 1], "attention_mask": [0, 1]}
    other = {"input_ids": torch.randint(0, 50, (3, 7)), "attention_mask": torch.ones(3, 7)}
    torch.testing.assert_close(gm(**other), m(**other))


def test_static_when_the_model_fixes_the_shape():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 2)

        def forward(self, x):
            return self.lin(x.reshape(4, 6))  # batch must be 4

    gm = capture(Fixed(), (torch.randn(4, 6),))
    assert gm.meta["sparsecomp.capture"].dynamic == {}


def test_data_dependent_control_flow_is_named_with_the_module():
    with pytest.raises(CaptureError) as e:
        capture(Branchy(), (torch.randn(2, 3),), name="branchy")
    msg = e.value.message
    assert "data-dependent control flow" in msg
    assert "'inner' (Inner)" in msg and "x.sum() > 0" in msg
    assert "torch.cond" in e.value.hint


def test_model_that_does_not_run_eagerly():
    with pytest.raises(CaptureError, match="does not run eagerly on the example inputs.*mat1 and mat2|shapes"):
        capture(nn.Linear(4, 2), (torch.randn(3, 5),), name="lin")


def test_not_a_module_and_bad_inputs():
    with pytest.raises(CaptureError, match="expected a torch.nn.Module"):
        capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(CaptureError, match="example inputs must be"):
        capture(nn.Linear(2, 2), 3.0)


def test_public_capture_is_the_function_even_after_submodules_load():
    import sparsecomp
    import sparsecomp.api  # noqa: F401  (imports the frontend module)

    assert callable(sparsecomp.capture)
    gm = sparsecomp.capture(nn.Linear(3, 2), (torch.randn(2, 3),))
    assert isinstance(gm, torch.fx.GraphModule)


def test_varargs_forward_keeps_batch_dynamic():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, *xs):
            return self.lin(torch.cat(xs, dim=-1))

    m = Cat()
    gm = capture(m, (torch.randn(3, 5), torch.randn(3, 3)))
    assert gm.meta["sparsecomp.capture"].dynamic  # the spec matched forward(self, *xs)
    a, b = torch.randn(6, 5), torch.randn(6, 3)
    assert torch.allclose(gm(a, b), m(a, b), atol=1e-6)


def test_a_model_in_training_mode_is_captured_in_eval_mode_and_left_as_it_was():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 8))
    m[2].eval()  # mixed modes must come back exactly
    x = torch.randn(4, 16)
    gm = capture(m, (x,))
    assert m.training and not m[2].training and m[1].training  # as it was
    info = gm.meta["sparsecomp.capture"]
    assert any("training mode" in n for n in info.notes)
    m.eval()
    ok, err, allowed = compare_outputs(gm(x), m(x))  # the graph is the eval-mode model
    assert ok, (err, allowed)
    assert not any("training mode" in n for n in capture(m, (x,)).meta["sparsecomp.capture"].notes)


def test_weights_on_the_meta_device_are_a_capture_error():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8)).to("meta")
    with pytest.raises(CaptureError, match="0.weight .* on the meta device"):
        capture(m, (torch.randn(2, 8, device="meta"),))
