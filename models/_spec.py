"""What every zoo entry provides, and the helpers the model modules share (private).

A model module declares one `Spec` per zoo name in a module-level `ZOO` dict. The public functions
in `sparsecomp.models` (`get`, `calibration`, `info`) resolve the config, seed the RNGs and call
these; the model modules never seed anything themselves, so the seeding rules live in one place.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch
from torch import nn

Inputs = Union[tuple, dict]

__all__ = ["Spec", "Inputs", "derive_generator", "init_weights_", "build_initialized", "random_ids",
           "token_spec_fns", "check_heads"]


@dataclass(frozen=True)
class Spec:
    """One zoo entry.

    - `build(cfg)` returns the model; called with torch's global RNG already seeded, so all
      randomness in it must come from the global RNG (`torch.nn.init`, `torch.randn`, ...).
    - `example(cfg, seed)` returns one batch of example inputs.
    - `calibration(cfg, n, seed)` returns `n` batches shaped like the example (batch/seq may vary).
    - `validate(cfg)` raises ValueError for inconsistent configs (e.g. hidden % heads != 0).
    """

    description: str
    defaults: Mapping[str, Any]
    build: Callable[[dict], nn.Module]
    example: Callable[[dict, int], Inputs]
    calibration: Callable[[dict, int, int], list]
    inputs: str
    needs_hf: bool = False
    validate: Callable[[dict], None] | None = None


def derive_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for `purpose` ("example", "calibration", ...) derived from `seed`.

    Separate streams per purpose, so the calibration data never repeats the example inputs and
    drawing more calibration batches never changes the example. crc32, not `hash()`: Python's
    string hash is randomised per process.
    """
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(purpose.encode())) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def init_weights_(model: nn.Module, std: float = 0.02) -> nn.Module:
    """HF-transformer-style init from the global RNG: N(0, std) weights and embeddings,
    LayerNorm weight 1 and bias 0. Other modules keep their constructor's init.

    Linear biases are drawn N(0, std) too instead of HF's zeros, on purpose: a rewrite that drops
    or misplaces a bias must change the outputs, or tests could not catch it.
    """
    _init_known_(model, std)
    return model


def _init_known_(model: nn.Module, std: float) -> set[int]:
    done: set[int] = set()
    for module in model.modules():  # deterministic order: registration order
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.normal_(module.bias, 0.0, std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            continue
        done.update(id(p) for p in module.parameters(recurse=False))
    return done


def build_initialized(make: Callable[[], nn.Module], std: float = 0.02) -> nn.Module:
    """`make()` on the meta device, then memory and `init_weights_` once: the constructors'
    default init (kaiming-uniform per Linear) would be thrown away anyway, and skipping it
    halves the build time of the 100M-parameter models (bert-base, opt-125m-like).

    Only for models whose parameters all belong to Linear/Embedding/LayerNorm and that hold no
    buffers: anything else would be left as uninitialised memory, so it is refused.
    """
    with torch.device("meta"):
        model = make()
    if any(True for _ in model.buffers()):
        raise TypeError(f"{type(model).__name__} has buffers; build it without build_initialized")
    model.to_empty(device="cpu")
    done = _init_known_(model, std)
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise TypeError(f"build_initialized cannot initialise {missed[:3]}; build it directly")
    return model


def random_ids(gen: torch.Generator, batch: int, seq: int, vocab: int, low: int) -> torch.Tensor:
    """Token ids uniform in [low, vocab): ids below `low` are the special tokens (padding,
    BOS/EOS, unknown), which calibration data should not be full of."""
    return torch.randint(low, vocab, (batch, seq), generator=gen, dtype=torch.long)


def token_spec_fns(make_batch: Callable[[dict, torch.Generator], Inputs]):
    """`example` and `calibration` functions for models fed random data by `make_batch`."""

    def example(cfg: dict, seed: int) -> Inputs:
        return make_batch(cfg, derive_generator(seed, "example"))

    def calibration(cfg: dict, n: int, seed: int) -> list:
        gen = derive_generator(seed, "calibration")  # one stream: batch i does not depend on n
        return [make_batch(cfg, gen) for _ in range(n)]

    return example, calibration


def check_heads(cfg: dict) -> None:
    if cfg["hidden"] % cfg["heads"]:
        raise ValueError(f"hidden ({cfg['hidden']}) must be divisible by heads ({cfg['heads']})")
