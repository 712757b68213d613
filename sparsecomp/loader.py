"""MODEL arguments: `zoo:NAME`, `path/file.py:factory`, or `file.onnx` (part of the face).

`load_model(spec, impose=..., layers=..., weights=...)` turns the spelling every CLI command and
`sparsecomp.analyze` accept into a `LoadedModel`, applying `--weights FILE.pt` (a state dict) and
then `--impose SPEC [--layers GLOB]`. Every failure is a `ModelLoadError` naming the spec.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sparsecomp.errors import ModelLoadError, PatternError, SparsecompError
from sparsecomp.ir import normalize_inputs

__all__ = ["LoadedModel", "load_model", "random_like"]


@dataclass
class LoadedModel:
    spec: str
    name: str
    model: torch.nn.Module | None = None  # torch models
    example_inputs: Any = None
    onnx: Any = None  # onnx.ModelProto for .onnx files
    path: Path | None = None
    imposed: list[str] = field(default_factory=list)
    _calibration: Callable[[int, int], list] | None = None

    @property
    def is_onnx(self) -> bool:
        return self.onnx is not None

    def calibration(self, n: int, seed: int = 0) -> list:
        """`n` calibration batches: the zoo's generator, else random inputs like the example."""
        if n <= 0:
            return []
        if self._calibration is not None:
            return self._calibration(n, seed)
        if self.example_inputs is None:
            raise ModelLoadError(f"{self.spec}: no example inputs to draw calibration batches from")
        return [random_like(self.example_inputs, seed=seed + i) for i in range(n)]


def random_like(example: Any, *, seed: int = 0) -> Any:
    """Random inputs with the example's structure: N(0,1) floats; integers in the example's range."""
    g = torch.Generator().manual_seed(seed)

    def one(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, generator=g, dtype=t.dtype)
        if t.dtype == torch.bool:
            return torch.ones_like(t)
        lo, hi = int(t.min()), int(t.max())
        if lo == hi:  # masks / constant ids: keep them
            return t.clone()
        return torch.randint(lo, hi + 1, t.shape, generator=g, dtype=t.dtype)

    args, kwargs = normalize_inputs(example)
    if isinstance(example, dict):
        return {k: one(v) for k, v in kwargs.items()}
    if isinstance(example, torch.Tensor):
        return one(example)
    return tuple(one(a) for a in args)


def _load_zoo(spec: str, name: str) -> LoadedModel:
    from sparsecomp import models

    try:
        model, example = models.get(name)
    except models.MissingExtraError as err:
        raise ModelLoadError(f"{spec}: {err}", hint="pip install 'sparsecomp[hf]'") from None
    except ValueError as err:
        raise ModelLoadError(f"{spec}: {err}", hint="`sparsecomp analyze zoo:NAME` with a name from the list") from None
    return LoadedModel(spec, name, model, example, _calibration=lambda n, seed: models.calibration(name, n, seed=seed))


def _load_factory(spec: str, file: str, factory: str) -> LoadedModel:
    path = Path(file)
    if not path.is_file():
        raise ModelLoadError(f"{spec}: no such file '{file}'", hint="MODEL is zoo:NAME, path/file.py:factory or file.onnx")
    mod_name = f"_sparsecomp_user_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise ModelLoadError(f"{spec}: importing {file} failed: {type(err).__name__}: {err}", hint="--debug shows the trace") from err
    fn = getattr(module, factory, None)
    if not callable(fn):
        avail = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == mod_name]
        raise ModelLoadError(f"{spec}: {file} has no function '{factory}'", hint=f"functions there: {', '.join(avail) or 'none'}")
    try:
        result = fn()
    except Exception as err:
        raise ModelLoadError(f"{spec}: factory '{factory}' raised {type(err).__name__}: {err}", hint="--debug shows the trace") from err
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ModelLoadError(f"{spec}: factory '{factory}' must return (model, example_inputs), got {type(result).__name__}")
    return LoadedModel(spec, f"{path.stem}:{factory}", result[0].eval(), result[1])


def _load_onnx(spec: str) -> LoadedModel:
    from sparsecomp import onnx_io

    model = onnx_io.load_onnx(spec)
    return LoadedModel(spec, Path(spec).name, onnx=model, path=Path(spec))


def _apply_weights(loaded: LoadedModel, weights: str) -> None:
    if loaded.is_onnx:
        raise ModelLoadError(f"--weights applies to torch models, not to the ONNX file {loaded.spec}",
                             hint="export the model again with the weights loaded")
    if os.path.isdir(weights):
        raise ModelLoadError(f"--weights: '{weights}' is a directory", hint="give the state dict file, e.g. --weights pruned.pt")
    if not os.path.isfile(weights):
        raise ModelLoadError(f"--weights: no such file '{weights}'")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's own text runs to paragraphs (and suggests weights_only=False, which the CLI
        # deliberately does not offer: unpickling runs arbitrary code): its first line only
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ModelLoadError(f"--weights {weights}: not a loadable state dict ({type(err).__name__}: {first})",
                             hint="save it with torch.save(model.state_dict(), path): tensors only") from err
    if not isinstance(state, dict):
        raise ModelLoadError(f"--weights {weights}: expected a state dict, got {type(state).__name__}")
    own = loaded.model.state_dict()
    mismatched = [f"{k}: file {list(v.shape)}, model {list(own[k].shape)}" for k, v in state.items()
                  if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if mismatched:
        more = f" (and {len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        raise ModelLoadError(f"--weights {weights} does not fit {loaded.spec}: size mismatch for "
                             + "; ".join(mismatched[:5]) + more,
                             hint="the state dict must come from the same model (e.g. `sparsecomp sparsify` on the same MODEL)")
    result = loaded.model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"--weights {weights} does not fit {loaded.spec}: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}",
            hint="the state dict must come from the same model (e.g. `sparsecomp sparsify` on the same MODEL)",
        )


def load_model(spec: str, *, impose: str | None = None, layers: str | None = None, weights: str | None = None) -> LoadedModel:
    """Load a MODEL spelling, then apply `weights` and `impose` (see module docstring)."""
    if spec.startswith("zoo:"):
        loaded = _load_zoo(spec, spec[4:])
    elif spec.lower().endswith(".onnx"):
        loaded = _load_onnx(spec)
    elif ".py:" in spec:
        file, factory = spec.rsplit(":", 1)
        loaded = _load_factory(spec, file, factory)
    else:
        raise ModelLoadError(f"cannot read MODEL '{spec}'", hint="MODEL is zoo:NAME, path/file.py:factory or file.onnx")
    if weights:
        _apply_weights(loaded, weights)
    if impose is not None and not impose.strip():  # `--impose ""` (an unset shell variable): not "no pattern"
        raise PatternError("--impose: empty pattern", hint="unstructured:S | block:RxC:S | N:M, e.g. --impose unstructured:0.9")
    if layers and not impose:
        raise PatternError("--layers selects where --impose applies; give --impose SPEC too")
    if impose:
        from sparsecomp import patterns

        try:
            if loaded.is_onnx:
                from sparsecomp import onnx_io

                loaded.imposed = onnx_io.impose_onnx(loaded.onnx, impose, layers)
            else:
                loaded.imposed = patterns.impose(loaded.model, impose, layers)
        except SparsecompError as err:
            raise type(err)(f"{spec}: {err.message}", hint=err.hint) from None
    return loaded

