"""Signals and faults of the real process: Ctrl-C at any moment, SIGTERM, and an input cut
short under a running compress. Each must end in one ``error:`` line (or success), never a
traceback or a silent death by signal."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kenstream.cli import main
from tests.test_reliability import (ROOT, assert_one_error, compress_argv, diff,  # noqa: F401
                                    nudged, pair, tensors)

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def child(script: str, *argv, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, argv)],
                          env=ENV, capture_output=True, text=True, timeout=timeout)


# -- 17. Ctrl-C before, during and after the work -------------------------------------------

def test_ctrl_c_while_starting_up(diff):
    """SIGINT while the command line is still being set up (here: while its parser is built)."""
    proc = child("""
        import os, signal, sys
        import kenstream.cli as cli
        real = cli.build_parser
        def interrupted():
            os.kill(os.getpid(), signal.SIGINT)
            return real()
        cli.build_parser = interrupted
        sys.argv = ["kenstream", "info", sys.argv[1]]
        cli.entry()
    """, diff[2])
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "error: interrupted\n"


def test_ctrl_c_swallowed_by_a_finalizer_still_ends_the_run(pair):
    """A SIGINT handled while a finalizer runs raises there, and Python prints "Exception
    ignored" and goes on. The interrupt is remembered: the run still ends as interrupted
    (exit 130, one line, resumable, no index), never as a finished diff."""
    b, f, out = pair
    proc = child("""
        import os, signal, sys
        import kenstream.engine.stream as stream
        real = stream._select
        calls = []
        class Lost:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
        def select(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                Lost()  # dropped at once: the interrupt lands in its finalizer
            return real(*args, **kwargs)
        stream._select = select
        from kenstream.cli import entry
        sys.argv = ["kenstream", *sys.argv[1:]]
        entry()
    """, *compress_argv(b, f, out))
    assert proc.returncode == 130, proc.stderr
    # One error line; the lost raise is not printed as an ignored exception either.
    assert proc.stderr.splitlines()[-1] == "error: interrupted; rerun with --resume to continue"
    assert proc.stderr.count("error:") == 1
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "kenstream-diff.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]
    assert main([*map(str, compress_argv(b, f, out)), "--resume", "-q"]) == 0
    assert (out / "kenstream-diff.json").exists()


def test_ctrl_c_after_the_work_is_done(diff):
    """SIGINT once the command has finished (at exit) changes nothing: exit 0, no traceback."""
    proc = child("""
        import atexit, os, signal, sys, time
        from kenstream.cli import entry
        atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))
        sys.argv = ["kenstream", "info", sys.argv[1]]
        entry()
    """, diff[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and "diff:" in proc.stdout


_STARTED = """
import importlib.util, runpy, sys
import kenstream
importlib.util.find_spec("kenstream.__main__")
sys.argv = ["kenstream", *sys.argv[1:]]
print("up", flush=True)  # the interpreter is up: from here on, kenstream handles Ctrl-C
runpy.run_module("kenstream", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("delay", [0.005, 0.02, 0.1, 0.3, 0.8])
def test_ctrl_c_at_any_moment(diff, delay):
    """A real Ctrl-C at a sweep of moments of `kenstream info`, counted from the end of the
    interpreter's own start-up (a signal before that hits Python's initialisation, which no
    program can handle): it either finished or says it was interrupted, in one line."""
    proc = subprocess.Popen([sys.executable, "-c", _STARTED, "info", str(diff[2])], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), (proc.returncode, err)
    assert "Traceback" not in err and err.count("\n") <= 1, err
    assert proc.returncode == 0 or err == "error: interrupted\n"


def test_interrupted_verify_does_not_suggest_resume(diff, capsys, monkeypatch):
    b, f, d = diff
    verify_module = importlib.import_module("kenstream.engine.verify")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify_module._Checking, "finish", interrupted)
    assert main([str(a) for a in ["verify", d, "--base", b, "--finetuned", f, "-q"]]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


# -- 11. an input truncated while compress reads it --------------------------------------------

_TRUNCATE = """
    import os, sys, time
    import numpy as np
    import kenstream.kernels as kernels
    victim, when = sys.argv[1], sys.argv[2]
    real = kernels.select
    calls = []
    def select(method, block, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if when == "between-blocks":
                block = np.array(block)  # read now; the next read is checked first
                time.sleep(0.3)  # the previous block's packing has surely ended
            os.truncate(victim, 4096)  # before-block: this block's pages are gone
        return real(method, block, *args, **kwargs)
    kernels.select = select
    from kenstream.cli import entry
    sys.argv = ["kenstream", *sys.argv[3:]]
    entry()
"""


@pytest.mark.parametrize("when, needle", [("between-blocks", "shrank from"),
                                          ("before-block", "bus error")])
def test_input_truncated_during_compress(tmp_path, when, needle):
    base = {f"layers.{i}.weight": t for i, t in
            enumerate(tensors(rows=64, cols=256).values()) if t.dim() == 2}
    b = save(tmp_path / "base", base)
    f = save(tmp_path / "ft", nudged(base))
    out = tmp_path / "out"
    victim = f / "model.safetensors"
    proc = child(_TRUNCATE, victim, when, *compress_argv(b, f, out, "-q"))
    assert proc.returncode == 2, proc.stderr
    assert_one_error(proc.stderr, str(victim), needle)
    assert not (out / "kenstream-diff.json").exists()
    assert (out / "kenstream-diff.partial.json").exists()  # resumable once the file is whole


def save(folder, state):
    from tests.ckpt import save_dir

    return save_dir(folder, state)


_LOST_IN_IMPORT = """
import sys
import kenstream.__main__ as launcher


class Lost:
    def __del__(self):  # what a Ctrl-C in an import lock's weakref callback looks like
        raise KeyboardInterrupt


class Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "kenstream.cli":
            Lost()  # dropped at once: Python reports the raise as ignored, and goes on
        return None


sys.meta_path.insert(0, Finder())
sys.argv = ["kenstream", "info", sys.argv[1]]
launcher.run()
"""


def test_an_interrupt_python_ignores_while_the_command_line_loads_ends_the_run(diff):
    """The interrupt is not raised where it lands, but it is not lost either: the run
    ends as interrupted, in one line, instead of a printed traceback and a finished run."""
    proc = subprocess.run([sys.executable, "-c", _LOST_IN_IMPORT, str(diff[2])], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "error: interrupted\n", "")
