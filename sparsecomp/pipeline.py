"""Pipelines as text.

Grammar (whitespace between tokens is ignored)::

    pipeline := entry ("," entry)*
    entry    := PASS-NAME [ "{" option ("," option)* "}" ]
    option   := NAME "=" value
    value    := bare word without , { } = "   |   "quoted text"

`str(parse_pipeline(text)) == text` for every canonical text (no spaces, values as written), so a
pipeline printed in a dump header or an error message is an exact repro. Option values keep the
text the user wrote; their typed values come from the pass's signature (`sparsecomp.registry`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sparsecomp.errors import PipelineError
from sparsecomp.registry import PassInfo, get_pass

__all__ = ["PipelineEntry", "Pipeline", "parse_pipeline"]

_BARE = re.compile(r"[^,{}=\"\s]+")


@dataclass(frozen=True)
class PipelineEntry:
    name: str
    raw_options: tuple[tuple[str, str], ...] = ()

    @property
    def info(self) -> PassInfo:
        return get_pass(self.name)

    @property
    def options(self) -> dict[str, Any]:
        """Typed option values (defaults filled in)."""
        return self.info.resolve_options(dict(self.raw_options))

    @property
    def lossy(self) -> bool:
        """Whether this entry changes the model's function (`PassInfo.is_lossy`)."""
        return self.info.is_lossy(self.options)

    def __str__(self) -> str:
        if not self.raw_options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_quote(v)}" for k, v in self.raw_options) + "}"


def _quote(value: str) -> str:
    return value if _BARE.fullmatch(value) else '"' + value + '"'


@dataclass(frozen=True)
class Pipeline:
    entries: tuple[PipelineEntry, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return ",".join(str(e) for e in self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def validate(self) -> "Pipeline":
        """Check every pass and option exists and every value parses; returns self."""
        for e in self.entries:
            try:
                e.info.resolve_options(dict(e.raw_options))
            except PipelineError as err:
                raise PipelineError(f"{err.message} in pipeline '{self}'", hint=err.hint) from None
        return self


def parse_pipeline(text: str, *, validate: bool = True) -> Pipeline:
    """Parse pipeline text; with `validate`, unknown passes/options fail here with the valid list."""
    if not isinstance(text, str):
        raise PipelineError(f"a pipeline must be text, got {type(text).__name__}")
    pos, n = 0, len(text)
    entries: list[PipelineEntry] = []

    def skip_ws() -> None:
        nonlocal pos
        while pos < n and text[pos].isspace():
            pos += 1

    def fail(what: str) -> PipelineError:
        return PipelineError(
            f"malformed pipeline '{text}': {what} at column {pos + 1}",
            hint='write passes as name{option=value,...} separated by commas, e.g. "analyze-weights,find-mlps"',
        )

    def word() -> str:
        nonlocal pos
        skip_ws()
        if pos < n and text[pos] == '"':
            end = text.find('"', pos + 1)
            if end < 0:
                raise fail("unterminated quote")
            value, pos = text[pos + 1 : end], end + 1
            return value
        m = _BARE.match(text, pos)
        if not m:
            raise fail("expected a name or value")
        pos = m.end()
        return m.group(0)

    skip_ws()
    if pos == n:
        raise PipelineError("empty pipeline", hint="name at least one pass; `sparsecomp passes` lists them")
    while True:
        name = word()
        opts: list[tuple[str, str]] = []
        skip_ws()
        if pos < n and text[pos] == "{":
            pos += 1
            while True:
                key = word()
                skip_ws()
                if pos >= n or text[pos] != "=":
                    raise fail(f"expected '=' after option '{key}'")
                pos += 1
                opts.append((key, word()))
                skip_ws()
                if pos < n and text[pos] == ",":
                    pos += 1
                    continue
                if pos < n and text[pos] == "}":
                    pos += 1
                    break
                raise fail("expected ',' or '}'")
            if len({k for k, _ in opts}) != len(opts):
                raise fail(f"option given twice for pass '{name}'")
        entries.append(PipelineEntry(name, tuple(opts)))
        skip_ws()
        if pos == n:
            break
        if text[pos] != ",":
            raise fail("expected ','")
        pos += 1
    pipeline = Pipeline(tuple(entries))
    return pipeline.validate() if validate else pipeline
