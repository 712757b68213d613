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


@pytest.fixture(scope="module", autouse=True)
def _test_passes():
    """This module's passes exist while its tests run, not in the registry other tests see."""
    register_pass("test-double-relu", kind="rewrite")(_double_relu)
    register_pass("test-break-outputs", kind="rewrite")(_break)
    yield
    unregister_pass("test-double-relu")
    unregister_pass("test-break-outputs")


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
