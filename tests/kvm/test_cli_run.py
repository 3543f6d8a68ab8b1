"""`vlab run FILE` as a learner types it: a shipped example guest, a raw binary, an ELF, a
runaway guest, a missing file; and the CPU mode a guest asks for."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlab.machine.assembler import assemble
from vlab.machine.boot import guest_mode

REPO = Path(__file__).resolve().parents[2]
LONG_GUEST = REPO / "vlab" / "machine" / "guests" / "long.asm"

pytestmark = pytest.mark.kvm


def vlab_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlab.cli", "run", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_run_the_long_mode_example():
    """`bits 64` in the source picks long mode; the console comes first, then the summary."""
    proc = vlab_run(str(LONG_GUEST), "--accel", "kvm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "Hello from long mode"
    assert lines[1].startswith("--- kvm, long mode, stopped: HLT: the guest halted after 22 exits")
    assert "22 userspace exits" in lines
    assert any(line.split() == ["IO", "out", "21"] for line in lines)
    assert any(line.split() == ["HLT", "1"] for line in lines)
    # the stats fd's counters in the kernel's order, which differs between backends
    head, counters = lines[-1].split(": ", 1)
    assert head == "in-kernel counters over the run"
    assert int(dict(c.split("=") for c in counters.split(", "))["exits"]) >= 22


def test_run_a_raw_binary_at_org_with_its_debug_exit_status(tmp_path):
    code = assemble("mov al, 'r'\nout 0xe9, al\nmov al, 2\nout 0xf4, al\nhlt\n", bits=16,
                    org=0x7C00).code
    (tmp_path / "boot.bin").write_bytes(code)
    proc = vlab_run(str(tmp_path / "boot.bin"), "--org", "0x7c00", "--memory", "1M",
                    "--accel", "kvm")
    assert proc.returncode == 5, proc.stdout + proc.stderr  # (2 << 1) | 1
    assert proc.stdout.startswith("r\n--- kvm, real mode, stopped: isa-debug-exit")


@pytest.mark.skipif(shutil.which("ld") is None, reason="no linker (ld) to build the ELF")
def test_run_an_elf64_in_long_mode(tmp_path):
    """An ELF64 executable goes where its program header says and starts in long mode."""
    (tmp_path / "e.asm").write_text("bits 64\nglobal _start\n_start:\n"
                                    "mov al, 'E'\nout 0xe9, al\nhlt\n")
    subprocess.run(["nasm", "-f", "elf64", "-o", str(tmp_path / "e.o"), str(tmp_path / "e.asm")],
                   check=True)
    subprocess.run(["ld", "-static", "-nostdlib", "-Ttext=0x100000", "-e", "_start",
                    "-o", str(tmp_path / "e.elf"), str(tmp_path / "e.o")], check=True)
    proc = vlab_run(str(tmp_path / "e.elf"), "--accel", "kvm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("E\n--- kvm, long mode, stopped: HLT")
    assert "RIP=0x100005" in proc.stdout


def test_run_with_a_timeout(tmp_path):
    (tmp_path / "spin.asm").write_text("jmp $\n")
    proc = vlab_run(str(tmp_path / "spin.asm"), "--timeout", "0.2", "--accel", "kvm")
    assert proc.returncode == 1
    assert "stopped: timeout after 0.2 s" in proc.stdout


def test_run_a_missing_file():
    proc = vlab_run("/nonexistent/guest.asm")
    assert proc.returncode == 2
    assert proc.stderr.startswith("vlab run: ") and "No such file" in proc.stderr


@pytest.mark.parametrize("name, text, mode", [
    ("guest.asm", "bits 64\nhlt\n", "long"),
    ("guest.asm", "bits 32\nhlt\n", "protected"),
    ("guest.asm", "hlt\n", "real"),
    ("guest.bin", "\xf4", "real"),
])
def test_the_mode_a_guest_asks_for(tmp_path, name, text, mode):
    (tmp_path / name).write_text(text)
    assert guest_mode(tmp_path / name, None).value == mode
    assert guest_mode(tmp_path / name, "paged").value == "paged"  # asked for: wins
