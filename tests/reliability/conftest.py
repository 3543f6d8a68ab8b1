"""The reliability tier: nothing crashes, hangs or leaks.

A test that hangs fails: the watchdog (`@pytest.mark.watchdog(seconds)`, default
WATCHDOG_SECONDS) raises in the main thread when its time is up, which also ends a KVM_RUN
blocked there (the signal makes the ioctl return EINTR), and prints every thread's stack.
If the main thread cannot take that signal (stuck in C code), faulthandler ends the whole
process GRACE seconds later, so CI fails instead of waiting. Code that may crash the
interpreter runs in a subprocess, so a segfault fails one test: a script through the
`isolated(code)` fixture, or a whole test marked `@pytest.mark.isolated` (pytest runs it
again, alone, in a child process).
"""
from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WATCHDOG_SECONDS = 60.0
GRACE = 30.0   # after the watchdog fired, until the process is ended
ROOT = Path(__file__).resolve().parents[2]
CHILD = "VLAB_ISOLATED_TEST"   # set in the child that runs an isolated test


def pytest_configure(config):
    config.addinivalue_line("markers", "watchdog(seconds): fail the test if it runs longer")
    config.addinivalue_line("markers", "isolated: run the test in a child pytest process")


def _died(returncode: int, output: str) -> None:
    """Fail the test if a child process was killed by a signal (a crash)."""
    if returncode < 0:
        pytest.fail(f"the child died of {signal.Signals(-returncode).name}\n{output}",
                    pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if pyfuncitem.get_closest_marker("isolated") is None or os.environ.get(CHILD):
        return None
    done = subprocess.run([sys.executable, "-m", "pytest", pyfuncitem.nodeid, "-q",
                           "-p", "no:cacheprovider"], cwd=pyfuncitem.config.rootpath,
                          env={**os.environ, CHILD: "1", "PYTHONFAULTHANDLER": "1"},
                          capture_output=True, text=True)
    output = done.stdout + done.stderr
    _died(done.returncode, output)
    if done.returncode != 0:
        pytest.fail(f"in a child process:\n{output}", pytrace=False)
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    marker = item.get_closest_marker("watchdog")
    seconds = float(marker.args[0]) if marker else WATCHDOG_SECONDS

    def expire(signum, frame):
        faulthandler.dump_traceback(all_threads=True)
        pytest.fail(f"hung: still running after the watchdog's {seconds:g} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + GRACE, exit=True)
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def isolated():
    """`isolated(code, timeout=30)`: run Python `code` in a fresh interpreter (vlab from
    this checkout) and return the CompletedProcess. A crash (killed by a signal) or a hang
    fails the test with what the child printed; the caller checks the rest."""

    def run(code: str, timeout: float = 30.0, **kwargs) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
        try:
            done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=timeout,
                                  **kwargs)
        except subprocess.TimeoutExpired as e:
            out, err = (s.decode(errors="replace") if isinstance(s, bytes) else s or ""
                        for s in (e.stdout, e.stderr))
            pytest.fail(f"hung: the child ran longer than {timeout} s\n"
                        f"stdout:\n{out}\nstderr:\n{err}", pytrace=False)
        _died(done.returncode, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
        return done

    return run
