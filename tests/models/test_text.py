"""models.text: real, offline, deterministic sentences with disjoint splits."""

import hashlib
import subprocess
import sys

import pytest

from sparsecomp.models import text


def test_splits_are_disjoint_and_cover_the_corpus():
    cal, ev = text._pool("calibration"), text._pool("evaluation")
    assert len(cal) >= 1000 and len(ev) >= 1000
    assert not set(cal) & set(ev)
    assert len(set(cal)) == len(cal) and len(set(ev)) == len(ev)
    assert len(cal) + len(ev) == len(text.corpus())


def test_sentences_are_plain_english():
    for s in text.corpus():
        assert text.MIN_CHARS <= len(s) <= text.MAX_CHARS
        assert s.isascii() and s[0].isupper() and s[-1] in ".!?"
        assert ">>>" not in s and "\n" not in s


def test_sentences_api():
    a = text.sentences(50, split="calibration", seed=0)
    assert a == text.sentences(50, split="calibration", seed=0)
    assert text.sentences(20, split="calibration", seed=0) == a[:20]  # prefix property
    assert a != text.sentences(50, split="calibration", seed=1)
    assert not set(a) & set(text.sentences(500, split="evaluation", seed=0))
    assert len(set(a)) == 50 and text.sentences(0) == []
    with pytest.raises(ValueError):
        text.sentences(5, split="train")
    with pytest.raises(ValueError):
        text.sentences(10**6)


def test_identical_in_a_fresh_process_with_another_hash_seed():
    """Nothing may depend on Python's per-process string-hash randomisation or import state."""
    # Load text.py by path: it needs only the standard library, and this keeps torch out.
    code = (
        "import hashlib, importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('ztext', {text.__file__!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(hashlib.sha256('\\n'.join(m.sentences(300, split='evaluation', seed=3)).encode()).hexdigest())"
    )
    env = {"PYTHONHASHSEED": "12345", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd="/")
    here = hashlib.sha256("\n".join(text.sentences(300, split="evaluation", seed=3)).encode()).hexdigest()
    assert out.stdout.strip() == here
