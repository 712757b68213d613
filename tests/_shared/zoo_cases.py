"""The zoo at test size, shared by the backends' end-to-end matrices (tests/backends/*/test_zoo.py)
and the export test (tests/models/test_export.py).

Models run small: their layers repeat, so depth and width add time, not coverage.
"""

import torch

from sparsecomp.ir import normalize_inputs

SMALL = {
    "mlp-relu": {"hidden": 64, "ffn": 256},
    "bert-tiny": {"layers": 1},
    "bert-base": {"layers": 1, "hidden": 64, "heads": 4, "ffn": 128, "vocab": 500},
    "opt-125m-like": {"layers": 1, "hidden": 64, "heads": 4, "ffn": 128, "vocab": 500},
    "llama-tiny": {"layers": 1, "hidden": 64, "ffn": 96, "vocab": 500},
    "vit-tiny": {"layers": 1, "image": 32},
    "resnet18-like": {"image": 32, "width": 16, "classes": 10},
    "minilm": {"layers": 1, "max_length": 16},
}


def other_shape(example):
    """The example at batch 3 and, for token models, a sequence 3 shorter: a compiled model must
    take other batch / sequence sizes than it was compiled at."""
    args, kwargs = normalize_inputs(example)

    def grow(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        t = t.repeat(3, *[1] * (t.dim() - 1))
        if t.dim() == 2 and not t.is_floating_point():  # tokens / mask [B, T]: shorten T
            t = t[:, : max(1, t.shape[1] - 3)]
        return t

    return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}
