"""PassManager: instruments (print, dump, timing, verify-each) and provenance of created nodes."""

import io

import pytest
import torch
import torch.nn as nn

from sparsecomp.frontend import capture
from sparsecomp.errors import VerificationError
from sparsecomp.pass_manager import DumpIR, PassContext, PassManager, PrintIR, Timing, VerifyEach
from sparsecomp.registry import PassResult, register_pass, unregister_pass

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _double_relu(gm, ctx):
    """Insert a second (idempotent) relu after every relu: output unchanged, graph changed.

    Requires: an ATen graph.
    Ensures: every relu is followed by another relu tagged with rule 'relu-relu'.
    """
    n = 0
    for node in list(gm.graph.nodes):
        if node.target is aten.relu.default and node.meta.get("sparsecomp.provenance") is None:
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(aten.relu.default, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            new.meta["sparsecomp.rule"] = "relu-relu"
            n += 1
    return PassResult(n > 0, {"relu-relu": n})


def _break(gm, ctx):
    """Replace relu by neg: a wrong rewrite that verify-each must catch.

    Requires: an ATen graph.
    Ensures: outputs differ from eager (on purpose).
    """
    for node in gm.graph.nodes:
        if node.target is aten.relu.default:
            node.target = aten.neg.default
    return True


def _silent_break(gm, ctx):
    """Replace relu by sigmoid in place and say nothing changed (returns None).

    Requires: an ATen graph.
    Ensures: outputs differ from eager (on purpose), unannounced.
    """
    for node in gm.graph.nodes:
        if node.target is aten.relu.default:
            node.target = aten.sigmoid.default


def _silent_drop(gm, ctx):
    """Erase every relu (its users read its input) and report modified=False.

    Requires: an ATen graph.
    Ensures: outputs differ from eager (on purpose), unannounced.
    """
    for node in list(gm.graph.nodes):
        if node.target is aten.relu.default:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    return PassResult(modified=False)


def _misorder(gm, ctx):
    """Insert a neg of the relu before the relu (an invalid graph).

    Requires: an ATen graph.
    Ensures: a graph lint must reject.
    """
    relu = next(n for n in gm.graph.nodes if n.target is aten.relu.default)
    with gm.graph.inserting_before(relu):
        gm.graph.call_function(aten.neg.default, (relu,))
    return True


def _lossy_scale(gm, ctx, *, scale: float = 1.0):
    """Multiply the output by `scale`: lossy unless scale is 1 (declared to the registry).

    Requires: an ATen graph.
    Ensures: outputs scaled.
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (value,) = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    with gm.graph.inserting_before(out):
        new = gm.graph.call_function(aten.mul.Tensor, (value, scale))
    value.replace_all_uses_with(new, delete_user_cb=lambda u: u is out)
    return True


_PASSES = {"test-double-relu": (_double_relu, False), "test-break-outputs": (_break, False),
           "test-silent-break": (_silent_break, False), "test-silent-drop": (_silent_drop, False),
           "test-misorder": (_misorder, False), "test-lossy-scale": (_lossy_scale, lambda o: o["scale"] != 1.0)}


@pytest.fixture(scope="module", autouse=True)
def _test_passes():
    """This module's passes exist while its tests run, not in the registry other tests see."""
    for name, (fn, lossy) in _PASSES.items():
        register_pass(name, kind="rewrite", lossy=lossy)(fn)
    yield
    for name in _PASSES:
        unregister_pass(name)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    m = MLP().eval()
    x = torch.randn(4, 16)
    return capture(m, (x,)), PassContext.create((x,)), m, x


def test_provenance_stats_and_change_detection(setup):
    gm, ctx, m, x = setup
    timing = Timing()
    pm = PassManager("analyze-weights,test-double-relu", [timing])
    pm.run(gm, ctx)
    created = [n for n in gm.graph.nodes if "sparsecomp.provenance" in n.meta]
    assert len(created) == 1
    assert created[0].meta["sparsecomp.provenance"] == {"pass": "test-double-relu", "rule": "relu-relu"}
    assert [r.created for r in timing.records] == [0, 1]
    assert timing.records[1].stats == {"relu-relu": 1}
    assert timing.records[1].changed
    torch.testing.assert_close(gm(x), m(x))
    assert "total" in str(timing.table().columns[1]._cells)


def test_print_after_all_and_after_change(setup):
    gm, ctx, *_ = setup
    buf = io.StringIO()
    PassManager("find-mlps,test-double-relu", [PrintIR(after_change=True, stream=buf)]).run(gm, ctx)
    text = buf.getvalue()
    # find-mlps annotates (the printed IR changes), test-double-relu rewrites: both print
    assert text.count("// ----- IR after") == 2
    assert "mlp(region=0, role=up)" in text
    buf2 = io.StringIO()
    # running find-mlps again changes nothing: after-change stays silent, after-all prints
    PassManager("find-mlps", [PrintIR(after_change=True, stream=buf2)]).run(gm, ctx)
    assert buf2.getvalue() == ""
    buf3 = io.StringIO()
    PassManager("find-mlps", [PrintIR(after_all=True, before=("find-mlps",), stream=buf3)]).run(gm, ctx)
    assert "before find-mlps" in buf3.getvalue() and "[unchanged]" in buf3.getvalue()


def test_dump_dir_has_one_file_per_pass_with_repro_header(setup, tmp_path):
    gm, ctx, *_ = setup
    ctx.repro = "sparsecomp opt zoo:x --pipeline analyze-weights,find-mlps"
    PassManager("analyze-weights,find-mlps", [DumpIR(tmp_path / "d")]).run(gm, ctx)
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert files == ["000_input.txt", "001_analyze-weights.txt", "002_find-mlps.txt"]
    text = (tmp_path / "d" / "002_find-mlps.txt").read_text()
    assert text.startswith("// pipeline: analyze-weights,find-mlps\n")
    assert "// repro: sparsecomp opt" in text and "aten.linear" in text


def test_verify_each_passes_lossless_and_catches_a_wrong_rewrite(setup):
    gm, ctx, *_ = setup
    PassManager("test-double-relu", [VerifyEach()]).run(gm, ctx)  # lossless: no error
    with pytest.raises(VerificationError, match="after pass 'test-break-outputs'.*max abs error"):
        PassManager("test-break-outputs", [VerifyEach()]).run(gm, ctx)


@pytest.mark.parametrize("name", ["test-silent-break", "test-silent-drop"])
def test_a_pass_that_edits_in_place_and_says_nothing_is_still_run_and_caught(setup, name):
    """The module is recompiled whenever the printed graph changed, so the edit runs (and verify
    sees it), whatever the pass returned."""
    gm, ctx, m, x = setup
    with pytest.raises(VerificationError, match=f"after pass '{name}'.*max abs error"):
        PassManager(name, [VerifyEach()]).run(gm, ctx)
    assert not torch.allclose(gm(x), m(x))  # the graph runs the edit


def test_a_pass_that_leaves_an_invalid_graph_is_named(setup):
    gm, ctx, *_ = setup
    with pytest.raises(VerificationError, match="graph lint failed after pass 'test-misorder' \\(1/1\\).*used before"):
        PassManager("test-misorder", []).run(gm, ctx)


def test_verify_each_takes_a_lossy_pass_output_as_the_new_reference(setup):
    """A lossy entry (declared to the registry, per its options) changes the function as asked: the
    passes after it are checked against its outputs, and a wrong one after it is still caught."""
    gm, ctx, m, x = setup
    v = VerifyEach()
    PassManager("test-lossy-scale{scale=2.0},test-double-relu", [v]).run(gm, ctx)
    assert v.accepted == ["test-lossy-scale{scale=2.0}"]
    assert torch.allclose(gm(x), 2 * m(x))
    gm2, ctx2 = capture(m, (x,)), PassContext.create((x,))
    with pytest.raises(VerificationError, match="after pass 'test-break-outputs' \\(2/2\\)"):
        PassManager("test-lossy-scale{scale=2.0},test-break-outputs", [VerifyEach()]).run(gm2, ctx2)
    gm3, ctx3 = capture(m, (x,)), PassContext.create((x,))
    v3 = VerifyEach()
    PassManager("test-lossy-scale{scale=1.0}", [v3]).run(gm3, ctx3)  # its options make it lossless: checked as such
    assert v3.accepted == [] and torch.allclose(gm3(x), m(x))


def test_dump_dir_removes_an_earlier_runs_stages(setup, tmp_path):
    gm, ctx, *_ = setup
    d = tmp_path / "d"
    PassManager("analyze-weights,find-mlps,analyze-weights", [DumpIR(d)]).run(gm, ctx)
    (d / "notes.txt").write_text("mine")
    PassManager("find-mlps", [DumpIR(d)]).run(gm, ctx)
    assert sorted(p.name for p in d.iterdir()) == ["000_input.txt", "001_find-mlps.txt", "notes.txt"]
