"""The one progress bar: on stderr only, and only when stderr is a terminal."""

import io
import sys

from sparsecomp.progress import progress_bar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_quiet_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    with progress_bar("compiling m") as update:
        assert update is None
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_bar_writes_to_stderr_never_stdout(monkeypatch):
    err, out = _Tty(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    with progress_bar("compiling m", prefix="measuring kernels: ") as update:
        assert callable(update)
        update(1, 2, "fc1")
        update(2, 2, "fc2")
    assert out.getvalue() == ""  # `sparsecomp compile --json > file` stays valid JSON
    assert err.getvalue() != ""
