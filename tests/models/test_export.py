"""Every zoo model is capturable by torch.export (strict=False), with static and dynamic shapes.

The compiler's IR comes from `torch.export`, so a zoo model that does not export is useless to it.
The small models export at their full size; bert-base and opt-125m-like export with 2 layers
(their layers are identical, so depth adds time, not coverage). minilm is covered in
test_minilm.py.
"""

import pytest
import torch

from sparsecomp.models import get
from zoo_cases import SMALL as ZOO_SMALL

AUTO = torch.export.Dim.AUTO
FULL = {
    "mlp-relu": {},
    "bert-tiny": {},
    "bert-base": {"layers": 2},
    "opt-125m-like": {"layers": 2},
    "llama-tiny": {},
    "vit-tiny": {},
    "resnet18-like": {},
}
# For the dynamic-shape runs: the zoo at test size, since each model is traced and run several
# times (minilm is covered in test_minilm.py)
SMALL = {name: sizes for name, sizes in ZOO_SMALL.items() if name != "minilm"}
TOKEN_MODELS = {"bert-tiny", "bert-base", "opt-125m-like", "llama-tiny"}


def _split(inputs):
    return ((), inputs) if isinstance(inputs, dict) else (tuple(inputs), {})


def _assert_close(out, ref, rel=1e-5):
    err = (out - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max abs error {err}"


@pytest.mark.parametrize("name", list(FULL))
def test_export_matches_eager(name):
    model, example = get(name, **FULL[name])
    args, kwargs = _split(example)
    ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
    with torch.no_grad():
        ref = model(*args, **kwargs)
    _assert_close(ep.module()(*args, **kwargs), ref)


@pytest.mark.parametrize("name", list(SMALL))
def test_export_dynamic_batch_and_seq(name):
    """Trace at batch 2 (batch 1 would be specialised), then run at other batch/seq sizes."""
    tokens = name in TOKEN_MODELS
    trace_cfg = dict(SMALL[name], batch=2, **({"seq": 6} if tokens else {}))
    model, example = get(name, **trace_cfg)
    args, kwargs = _split(example)
    dims = {0: AUTO, 1: AUTO} if tokens else {0: AUTO}
    if kwargs:
        dynamic = {k: dims for k in kwargs}
    else:
        dynamic = tuple(dims for _ in args)
    ep = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic, strict=False)
    runner = ep.module()
    for batch, seq in ((3, 9), (1, 4)):
        _, other = get(name, **dict(trace_cfg, batch=batch, **({"seq": seq} if tokens else {})), seed=5)
        oargs, okwargs = _split(other)
        with torch.no_grad():
            ref = model(*oargs, **okwargs)
        out = runner(*oargs, **okwargs)
        assert out.shape == ref.shape and out.shape[0] == batch
        if tokens:
            assert out.shape[1] == seq
        _assert_close(out, ref)
