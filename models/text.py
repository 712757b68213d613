"""Real English text, offline and deterministic: sentences from the standard library's docstrings.

Why: calibrating and evaluating a real model (the zoo's `minilm`) needs real sentences, the
machines we run on have no network, and a test corpus must not change between runs. Python's
own documentation strings are well-written English prose that is always installed.

How the corpus is built (all of it deterministic):

1. A fixed, sorted list of pure-Python standard-library modules (`MODULES`). Their *source files*
   are parsed with `ast` (never imported), so nothing depends on the platform, on which optional
   C extensions or third-party packages are installed, on `python -OO` (which strips `__doc__`),
   or on import side effects: both branches of an `if sys.platform == ...` are read alike.
   Modules missing from this Python version are skipped.
2. Docstrings are taken in source order (module, then every class and function, nested ones
   included), split into paragraphs, and paragraphs that look like code, doctests, reST field
   lists or tables are dropped.
3. Paragraphs are split into sentences; a sentence is kept if it is 40-200 characters, ASCII,
   starts with a capital letter, ends with `.`, `!` or `?`, holds no code/markup characters
   (`= < > { } [ ] | \\ _ * ` # @ $ % ^ ~`) and is at least 85% letters and spaces.
4. Duplicates are dropped (first occurrence wins); the order stays the source order.

Splits: each sentence goes to `"calibration"` or `"evaluation"` by a stable hash of its text
(CRC-32, even -> calibration, odd -> evaluation). After de-duplication every sentence text occurs
once, so the two splits are disjoint by construction, and adding or removing a module never moves
a sentence from one split to the other. `sentences(n, split=..., seed=...)` shuffles the split
with `random.Random(seed)` (stable across platforms) and returns the first `n`, so a larger `n`
extends a smaller one.

The exact text depends on the Python version (docstrings are edited between minor releases,
rarely in a patch release); for one version it is identical on every machine and platform. Python 3.11 yields about 4,100
sentences (about 2,050 per split); building the corpus takes 1-2 s once per process.
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sysconfig
import zlib
from pathlib import Path

__all__ = ["MODULES", "SPLITS", "MIN_CHARS", "MAX_CHARS", "sentences", "corpus"]

SPLITS = ("calibration", "evaluation")
MIN_CHARS = 40
MAX_CHARS = 200

# Pure-Python modules with plenty of prose docstrings, sorted. Deliberately left out: modules that
# are thin wrappers over C code (their docs live in the C source), platform-specific modules
# (ntpath, _osx_support, msvcrt helpers), `this`/`antigravity`, and generated files
# (`_sysconfigdata_*`, `pydoc_data.topics`). Names missing from a Python version are skipped.
MODULES: tuple[str, ...] = tuple(sorted((
    "_pydecimal", "_pyio", "argparse", "ast", "base64", "bdb", "bisect", "calendar", "cmd",
    "codecs", "collections", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "difflib", "doctest", "email.feedparser", "email.header", "email.message", "email.utils",
    "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gettext", "glob", "gzip",
    "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib",
    "inspect", "ipaddress", "json", "json.decoder", "json.encoder", "locale", "logging",
    "logging.handlers", "mailbox", "mimetypes", "netrc", "numbers", "operator", "optparse",
    "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "plistlib", "poplib", "pprint",
    "pstats", "pydoc", "queue", "quopri", "random", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "subprocess", "symtable", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "turtle", "typing", "unittest.case", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "zipfile",
    "zipimport",
)))

# A sentence ends at . ! or ? followed by whitespace and a capital letter (or an opening quote).
# Abbreviations such as "e.g. Foo" split wrongly now and then; the filters below drop most of
# those fragments, and the rest are still English.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
# Characters that mark code, markup or tables rather than prose.
_SYMBOLS = re.compile(r"[=<>{}\[\]|\\_*`#@$%^~]")
_ABBREV_TAIL = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf|Mr|Dr|No)\.$")


def _source_path(module: str) -> Path | None:
    """The module's source file in *this* interpreter's standard library (never site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _docstrings(tree: ast.Module):
    """Docstrings of the module and of every class/function, in source order."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield doc
    for node in ast.walk(tree):  # breadth-first, but deterministic for a given source
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _prose_paragraphs(doc: str):
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if not lines:
            continue
        # Indented lines are code blocks or continuation of field lists; doctests and reST
        # directives/fields are not prose.
        if any(line.startswith((" ", "\t")) for line in lines):
            continue
        if any(line.lstrip().startswith((">>>", "...", ":", "..", "-", "*", "+")) for line in lines):
            continue
        yield " ".join(line.strip() for line in lines)


def _keep(sentence: str) -> bool:
    if not (MIN_CHARS <= len(sentence) <= MAX_CHARS):
        return False
    if not sentence.isascii() or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if _ABBREV_TAIL.search(sentence) or "  " in sentence or "::" in sentence:
        return False
    if _SYMBOLS.search(sentence):
        return False
    # Mostly words: letters and spaces make up at least 85% of the characters.
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters >= 0.85 * len(sentence)


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """All kept sentences, de-duplicated, in source order (module list order, then source)."""
    seen: set[str] = set()
    out: list[str] = []
    for module in MODULES:
        path = _source_path(module)
        if path is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for doc in _docstrings(tree):
            for para in _prose_paragraphs(doc):
                for sentence in _SENTENCE_END.split(re.sub(r"\s+", " ", para).strip()):
                    if _keep(sentence) and sentence not in seen:
                        seen.add(sentence)
                        out.append(sentence)
    if not out:
        raise RuntimeError(
            "no standard-library source files found under "
            f"{sysconfig.get_paths()['stdlib']!r}; this Python installation ships no .py sources"
        )
    return tuple(out)


def _split_of(sentence: str) -> str:
    return SPLITS[zlib.crc32(sentence.encode("utf-8")) & 1]


@functools.lru_cache(maxsize=2)
def _pool(split: str) -> tuple[str, ...]:
    return tuple(s for s in corpus() if _split_of(s) == split)


def sentences(n: int, *, split: str = "calibration", seed: int = 0) -> list[str]:
    """`n` distinct English sentences of 40-200 characters from the given split.

    Deterministic in (`n`, `split`, `seed`, Python minor version); `sentences(m)` is a prefix of
    `sentences(n)` for m <= n. The "calibration" and "evaluation" splits never share a sentence.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    pool = list(_pool(split))
    if n > len(pool):
        raise ValueError(f"asked for {n} sentences but the {split!r} split has only {len(pool)}")
    random.Random(seed).shuffle(pool)
    return pool[:n]
