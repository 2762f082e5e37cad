"""Runs ``python script.py args`` in a process forked from a warm interpreter.

A new Python spends 5 CPU-seconds importing torch, torchvision and Hydra before a smoke run
of train.py starts, and the suite starts dozens of them. Here a multiprocessing forkserver
(one per test process) imports them once and forks a fresh process for each command. The
child is a process of its own: its own environment, working directory, arguments, output
files and exit status; only the imports are done before it starts.

What a fork cannot take over from a fresh start is re-done in the child: the thread count
that ``OMP_NUM_THREADS`` sets when torch loads (the forkserver never runs a parallel op, so
forking it is safe), ``sys.path[0]``, line-buffered output, and the exit functions.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# What every command the tests run imports first (train.py, bcnn.cli.*, scripts/*.py), and
# what a run imports at its end: the Hydra callback's sweep summary and the matplotlib of
# its training curves (0.7 s less a run).
PRELOAD = ["torch", "torchvision", "hydra", "omegaconf", "bcnn.train", "tests._warm"]
PRELOAD += ["bcnn.cli.callbacks", "matplotlib.figure", "matplotlib.backends.backend_agg"]
_context: multiprocessing.context.ForkServerContext | None = None


def runnable(cmd: Sequence[str]) -> bool:
    """Whether ``cmd`` is ``python path.py ...`` or ``python -m module ...`` of this Python."""
    if len(cmd) < 2 or cmd[0] != sys.executable:
        return False
    return cmd[1].endswith(".py") or (cmd[1] == "-m" and len(cmd) > 2)


def _child(cmd: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    import atexit
    import runpy
    import traceback

    import torch

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stdin = open(os.devnull)  # noqa: SIM115
    code: object = 0
    try:
        if cmd[1] == "-m":
            sys.argv = [cmd[2], *cmd[3:]]
            sys.path[0] = cwd
            runpy.run_module(cmd[2], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(cmd[1])
            sys.argv = [cmd[1], *cmd[2:]]
            sys.path[0] = os.path.dirname(script)
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    except BaseException:  # printed as Python prints an uncaught error
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class Process:
    """A started command, with what tests use of ``subprocess.Popen``."""

    def __init__(self, cmd: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
        global _context
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        self.args = list(cmd)
        self._tmp = tempfile.TemporaryDirectory()
        self._out = os.path.join(self._tmp.name, "stdout")
        self._err = os.path.join(self._tmp.name, "stderr")
        self._proc = _context.Process(
            target=_child, args=(self.args, str(cwd), env, self._out, self._err)
        )
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (negative: killed by that signal).

        Raises:
            subprocess.TimeoutExpired: still running after ``timeout`` seconds.
        """
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Waits for the end (killed after ``timeout``); returns (stdout, stderr)."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self._proc.join()
            raise
        try:
            return tuple(  # type: ignore[return-value]
                Path(p).read_text() if os.path.exists(p) else "" for p in (self._out, self._err)
            )
        finally:
            self._tmp.cleanup()

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self._proc.kill()


def run(
    cmd: Sequence[str], cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)``, forked.

    Raises:
        subprocess.TimeoutExpired: the command ran past ``timeout`` seconds (it is killed).
    """
    proc = Process(cmd, cwd, env)
    stdout, stderr = proc.communicate(timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
