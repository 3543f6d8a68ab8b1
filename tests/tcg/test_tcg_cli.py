"""`vlab run FILE --accel tcg`: the same command on the software accelerator."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed")


def vlab_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlab.cli", "run", *args, "--accel", "tcg"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_run_the_long_mode_example_on_tcg():
    proc = vlab_run(str(REPO / "vlab" / "machine" / "guests" / "long.asm"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "Hello from long mode"
    assert lines[1].startswith("--- tcg, long mode, stopped: HLT: the guest halted after 22 exits")
    assert lines[-1] == "in-kernel counters over the run: exits=22, io_exits=21, halt_exits=1"


def test_a_runaway_guest_on_tcg_stops_at_the_timeout(tmp_path):
    (tmp_path / "spin.asm").write_text("jmp $\n")
    proc = vlab_run(str(tmp_path / "spin.asm"), "--timeout", "0.2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--- tcg, real mode, stopped: timeout after 0.2 s" in proc.stdout


def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path):
    """`vlab run ... | head`: no BrokenPipeError traceback, the status of a SIGPIPE."""
    (tmp_path / "chatty.asm").write_text(
        "mov cx, 20000\nl: mov dx, 0x3f8\nmov al, 'x'\nout dx, al\nmov al, 10\nout dx, al\n"
        "loop l\nhlt\n")
    proc = subprocess.Popen([sys.executable, "-m", "vlab.cli", "run", str(tmp_path / "chatty.asm"),
                             "--accel", "tcg"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline() == b"x\n"
    proc.stdout.close()                      # what `head -1` does after its line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 128 + 13, stderr
    assert "Traceback" not in stderr, stderr
