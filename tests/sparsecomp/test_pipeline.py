"""Pipeline text: parse/print round trip, typed options, and errors that list the valid choices."""

import pytest

from sparsecomp.errors import PipelineError
from sparsecomp.pipeline import parse_pipeline
from sparsecomp.registry import PassKind, all_passes, get_pass, register_pass, unregister_pass


@pytest.mark.parametrize("text", [
    "analyze-weights",
    "analyze-weights,find-mlps",
    "analyze-weights,find-mlps{min_hidden=64},profile-activations{thresholds=\"0.01,0.1\",max_batches=8}",
    "find-mlps{min_hidden=0}",
])
def test_round_trip_exact(text):
    assert str(parse_pipeline(text)) == text


def test_whitespace_is_normalised_and_options_typed():
    p = parse_pipeline(" analyze-weights , find-mlps { min_hidden = 16 } ")
    assert str(p) == "analyze-weights,find-mlps{min_hidden=16}"
    assert p.entries[1].options == {"min_hidden": 16}
    # defaults fill in what the text leaves out
    assert parse_pipeline("find-mlps").entries[0].options == {"min_hidden": 1}


def test_unknown_pass_lists_valid_ones_and_suggests():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("analyse-weights,find-mlps")
    assert "unknown pass 'analyse-weights'" in e.value.message
    assert "did you mean 'analyze-weights'" in e.value.hint
    assert "find-mlps" in e.value.hint


def test_unknown_option_lists_valid_options():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("find-mlps{min_hiden=3}")
    assert "no option 'min_hiden'" in e.value.message
    assert "min_hidden: int" in e.value.hint
    assert "find-mlps{min_hiden=3}" in e.value.message  # the pipeline is in the error: a repro


@pytest.mark.parametrize("text,what", [
    ("find-mlps{min_hidden=abc}", "expects int"),
    ("", "empty pipeline"),
    ("find-mlps{min_hidden}", "expected '='"),
    ("find-mlps{min_hidden=1", "expected ','"),
    ("find-mlps,,analyze-weights", "expected a name"),
    ('analyze-weights{blocks="1x4}', "unterminated quote"),
    ("find-mlps{min_hidden=1,min_hidden=2}", "given twice"),
])
def test_malformed(text, what):
    with pytest.raises(PipelineError, match=what):
        parse_pipeline(text)


def test_registry_lists_built_in_passes_with_contracts():
    """Every pass the sources under passes/ register is listed, with its contract (the list is
    read from the sources, so a new pass is covered without touching this test)."""
    import re
    from pathlib import Path

    import sparsecomp.passes

    root = Path(sparsecomp.passes.__file__).parent
    declared = {m for f in root.rglob("*.py") for m in re.findall(r'@register_pass\(\s*"([^"]+)"', f.read_text())}
    assert len(declared) >= 8
    built_in = {p.name: p for p in all_passes() if p.module.startswith("sparsecomp.passes")}
    assert set(built_in) == declared
    for info in built_in.values():
        assert info.section("Requires") and info.section("Ensures"), info.name
        assert info.kind in PassKind
    assert not [p.name for p in all_passes() if p.name.startswith("test-")]  # tests' passes do not leak


def test_register_requires_contract_and_typed_defaults():
    from sparsecomp.errors import SparsecompError

    with pytest.raises(SparsecompError, match="Requires"):
        @register_pass("test-no-contract", kind="analysis")
        def _a(gm, ctx):
            """No contract here."""

    with pytest.raises(SparsecompError, match="kebab-case"):
        @register_pass("Bad_Name", kind="analysis")
        def _b(gm, ctx):
            """x.

            Requires: nothing.
            Ensures: nothing.
            """

    with pytest.raises(SparsecompError, match="unsupported type"):
        @register_pass("test-bad-option", kind="analysis")
        def _c(gm, ctx, *, xs: list = None):
            """x.

            Requires: nothing.
            Ensures: nothing.
            """


def test_literal_and_bool_options():
    from typing import Literal

    @register_pass("test-typed-options", kind="rewrite")
    def _typed(gm, ctx, *, mode: Literal["exact", "threshold"] = "exact", flag: bool = False, ratio: float = 0.5):
        """Typed options.

        Requires: nothing.
        Ensures: nothing.
        Options:
          mode: which mode.
        """

    try:
        _check_typed_options()
    finally:
        unregister_pass("test-typed-options")
    with pytest.raises(PipelineError, match="unknown pass 'test-typed-options'"):
        get_pass("test-typed-options")


def _check_typed_options():
    e = parse_pipeline("test-typed-options{mode=threshold,flag=true,ratio=.25}").entries[0]
    assert e.options == {"mode": "threshold", "flag": True, "ratio": 0.25}
    assert str(e) == "test-typed-options{mode=threshold,flag=true,ratio=.25}"
    assert get_pass("test-typed-options").options["mode"].doc == "which mode."
    with pytest.raises(PipelineError, match="expects exact\\|threshold"):
        parse_pipeline("test-typed-options{mode=fast}")
    with pytest.raises(PipelineError, match="expects bool"):
        parse_pipeline("test-typed-options{flag=maybe}")


def test_option_bounds_are_checked_when_the_pipeline_is_parsed():
    """An int / float option declared `Annotated[..., Bounds(...)]` refuses values out of range,
    and every float option refuses nan / inf, with the pass and option named, before any work;
    values inside the range (and on a closed end) parse."""
    from typing import Annotated

    from sparsecomp.errors import SparsecompError
    from sparsecomp.registry import Bounds

    @register_pass("test-bounded-options", kind="analysis")
    def _bounded(gm, ctx, *, frac: Annotated[float, Bounds(0, 1, hi_open=True)] = 0.5, rows: Annotated[int, Bounds(lo=1)] = 8,
                 scale: float = 1.0):
        """Bounded options.

        Requires: nothing.
        Ensures: nothing.
        """

    try:
        info = get_pass("test-bounded-options")
        assert info.options["frac"].type_name == "float in [0, 1)" and info.options["rows"].type_name == "int >= 1"
        ok = parse_pipeline("test-bounded-options{frac=0,rows=1,scale=-3}")
        assert ok.entries[0].options == {"frac": 0.0, "rows": 1, "scale": -3.0}
        for text, match in (("frac=1", r"'frac' of pass 'test-bounded-options' must be in \[0, 1\), got '1'"),
                            ("frac=-0.1", r"must be in \[0, 1\)"), ("frac=nan", r"must be in \[0, 1\)"),
                            ("rows=0", "'rows' .* must be >= 1, got '0'"), ("scale=inf", "'scale' .* must be a finite number"),
                            ("scale=nan", "must be a finite number")):
            with pytest.raises(PipelineError, match=match):
                parse_pipeline(f"test-bounded-options{{{text}}}")
    finally:
        unregister_pass("test-bounded-options")
    with pytest.raises(SparsecompError, match="default is >= 1"):  # a declaration its own default breaks
        @register_pass("test-bad-bounds", kind="analysis")
        def _bad(gm, ctx, *, rows: Annotated[int, Bounds(lo=1)] = 0):
            """x.

            Requires: nothing.
            Ensures: nothing.
            """


@pytest.mark.parametrize("text", ["sparse-mlp{mode=threshold,max_rows=0}", "profile-activations{max_batches=-1}",
                                  "sparse-linear{min_sparsity=1.5}", "sparse-linear{min_features=-3}", "find-mlps{min_hidden=-5}",
                                  "sparse-mlp{margin=0.5}", "sparse-mlp{rank=-1}", "sparsify-magnitude{owl_m=inf}"])
def test_built_in_pass_options_out_of_range_are_refused(text):
    """Values that crashed inside a pass (max_rows=0: an empty kthvalue) or ran with odd results
    (max_batches=-1 profiled one batch and reported -1; min_sparsity=1.5 silently rewrote nothing)."""
    with pytest.raises(PipelineError, match="must be"):
        parse_pipeline(text)
