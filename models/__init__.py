"""The model zoo: small and standard-size models, in plain PyTorch, for tests and benchmarks.

    from sparsecomp.models import get, names, calibration, info
    model, example = get("bert-tiny", seed=0, layers=1)       # eval mode, fp32
    out = model(**example) if isinstance(example, dict) else model(*example)
    batches = calibration("bert-tiny", 8)                     # 8 batches shaped like `example`

Each entry covers one case the compiler must handle (see each module's docstring for why its
shape was chosen):

    mlp-relu       one OPT-style FFN block, the minimal exact-activation-sparsity case  mlp.py
    bert-tiny      BERT encoder, test size                                               bert.py
    bert-base      BERT encoder, the standard CPU sparse-inference benchmark             bert.py
    opt-125m-like  ReLU decoder (activation sparsity), OPT-125m shapes                  opt.py
    llama-tiny     SwiGLU/RMSNorm/rotary decoder, test size                              llama.py
    vit-tiny       ViT-Ti/16 vision transformer                                          vit.py
    resnet18-like  ResNet-18 CNN with BatchNorm                                          resnet.py
    minilm         the real pretrained all-MiniLM-L6-v2 (needs the `hf` extra)           minilm.py

Contract:
- `get(name, seed=0, **overrides) -> (model, example_inputs)`. The model is in eval mode, fp32,
  with weights drawn from `seed` (same seed, same machine -> bit-identical weights; the caller's
  global RNG state is left untouched). `example_inputs` is a tuple of positional tensors, or a
  dict of keyword tensors for models that take keywords (`bert-*`, `minilm`).
- `overrides` replace config values (`info(name).config` lists them, e.g. `layers`, `hidden`,
  `batch`, `seq`); values given as strings (from a CLI) are converted to the default's type.
  An unknown key raises ValueError listing the valid ones; an unknown name raises ValueError
  listing all names.
- `calibration(name, n, seed=0, **overrides)`: `n` batches with the example's structure and
  dtypes (batch and seq as configured; `minilm`'s seq varies with its sentences), drawn from a
  stream separate from the example's, deterministic per seed; the first k batches do not depend
  on `n`. Random models get random token ids (never the special/padding ids) or N(0, 1) images;
  `minilm` gets real sentences (`models.text`).
- `get("minilm")` without the `hf` extra raises `MissingExtraError` (an ImportError) whose
  message says `pip install 'sparsecomp[hf]'`; `info("minilm")` works without it.
- The zoo is plain PyTorch and imports nothing else from sparsecomp (dependencies point one way:
  the face imports the zoo). Model modules load lazily; `minilm` imports transformers only when
  it is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch

from .minilm import MissingExtraError

__all__ = ["ZooEntry", "MissingExtraError", "names", "info", "get", "calibration"]

# name -> module under models/ that defines it (in its `ZOO` dict). Order is the listing order.
_MODULES: dict[str, str] = {
    "mlp-relu": "mlp",
    "bert-tiny": "bert",
    "bert-base": "bert",
    "opt-125m-like": "opt",
    "llama-tiny": "llama",
    "vit-tiny": "vit",
    "resnet18-like": "resnet",
    "minilm": "minilm",
}


@dataclass(frozen=True)
class ZooEntry:
    """What `info(name)` tells about a zoo model, without building it."""

    name: str
    description: str  # one line
    config: Mapping[str, Any]  # the defaults; every key is a valid override
    needs_hf: bool  # needs `pip install 'sparsecomp[hf]'`
    inputs: str  # the structure of example_inputs, in words


def names() -> list[str]:
    """All zoo model names, in a fixed order (grouped by family, small before big)."""
    return list(_MODULES)


def _lookup(name: str):
    if name not in _MODULES:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(_MODULES)}")
    module = importlib.import_module(f".{_MODULES[name]}", __name__)
    return module.ZOO[name]


def info(name: str) -> ZooEntry:
    """Name, description, default config and extras of zoo model `name`."""
    spec = _lookup(name)
    return ZooEntry(name, spec.description, MappingProxyType(dict(spec.defaults)), spec.needs_hf, spec.inputs)


def _convert(name: str, key: str, value: Any, default: Any) -> Any:
    """Coerce an override to the default's type; ints must be >= 1 (sizes and counts)."""
    kind = type(default)
    try:
        if isinstance(value, bool) or (isinstance(value, float) and kind is int and not value.is_integer()):
            raise TypeError
        converted = kind(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"override {key}={value!r} for {name!r} must be {kind.__name__} (default {default!r})"
        ) from None
    if kind is int and converted < 1:
        raise ValueError(f"override {key}={value!r} for {name!r} must be >= 1")
    return converted


def _config(name: str, spec, overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"unknown override(s) {', '.join(unknown)} for zoo model {name!r}; "
            f"valid: {', '.join(spec.defaults)}"
        )
    cfg = dict(spec.defaults)
    for key, value in overrides.items():
        cfg[key] = _convert(name, key, value, spec.defaults[key])
    if spec.validate is not None:
        spec.validate(cfg)
    return cfg


def get(name: str, *, seed: int = 0, **overrides):
    """Build zoo model `name`: returns `(model, example_inputs)`, model in eval mode, fp32."""
    spec = _lookup(name)
    cfg = _config(name, spec, overrides)
    # Seed a private copy of the global RNG: init is reproducible and the caller's stream is not
    # disturbed. fp32 default dtype during the build, whatever the caller set.
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: leave CUDA RNGs alone
        torch.set_default_dtype(torch.float32)
        try:
            model = spec.build(cfg)
        finally:
            torch.set_default_dtype(dtype)
    model.eval()
    return model, spec.example(cfg, seed)


def calibration(name: str, n: int, *, seed: int = 0, **overrides) -> list:
    """`n` input batches for zoo model `name`, structured like `get(name)`'s example inputs."""
    spec = _lookup(name)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return spec.calibration(_config(name, spec, overrides), n, seed)
