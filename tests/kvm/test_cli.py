"""The `vlab` command as a learner runs it: `doctor` and `caps` against this machine's KVM,
and `doctor` on a machine without KVM ($VLAB_KVM_DEVICE pointing at a missing file)."""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlab import cli
from vlab.kvm import Cap, Kvm
from vlab.kvm import vcpu as vcpu_module
from vlab.machine import runloop as runloop_module
from vlab.kvm.errors import hint_for
from vlab.kvm.system import DEVICE_ENV

REPO = str(Path(__file__).resolve().parents[2])
BACKEND_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")


def vlab(*args: str, module: str = "vlab.cli") -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != DEVICE_ENV}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**env, "PYTHONPATH": REPO})


def caps_listed(text: str) -> dict[Cap, int]:
    """`vlab caps` lines: number, KVM_CAP_NAME, value (in the order printed)."""
    rows = re.findall(r"^(\d+)\s+KVM_CAP_(\w+)\s+(\d+)$", text, re.MULTILINE)
    assert all(Cap[name] == int(number) for number, name, _ in rows)
    return {Cap[name]: int(value) for _, name, value in rows}


@pytest.mark.kvm
def test_doctor_on_this_machine():
    proc = vlab("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = [m for m in BACKEND_MODULES if Path("/sys/module", m).exists()]
    assert found, "no KVM backend module in /sys/module"
    assert f"backend: {found[0]} " in proc.stdout
    assert "API version 12" in proc.stdout
    assert "auto: kvm" in proc.stdout
    with Kvm() as kvm:
        for cap in cli.DOCTOR_CAPS:
            row = re.search(rf"^  {cap.name} +(\d+) +\S", proc.stdout, re.MULTILINE)
            assert row and int(row[1]) == kvm.check_extension(cap), cap.name
    for tool in ("nasm", "unicorn", "capstone"):
        assert re.search(rf"^  (ok|MISSING) +{tool} ", proc.stdout, re.MULTILINE), tool


@pytest.mark.kvm
def test_caps_lists_present_capabilities_with_their_values():
    proc = vlab("caps", module="vlab")
    assert proc.returncode == 0, proc.stderr
    with Kvm() as kvm:
        expected = {cap: value for cap, value in kvm.capabilities().items() if value}
    listed = caps_listed(proc.stdout)
    assert listed == expected and list(listed) == list(expected)
    assert f"{len(expected)} of {len(Cap)} capabilities present" in proc.stdout


@pytest.mark.kvm
def test_caps_all_puts_present_ones_first():
    listed = caps_listed(vlab("caps", "--all").stdout)
    assert set(listed) == set(Cap)
    values = list(listed.values())
    first_absent = values.index(0)
    assert all(values[:first_absent]) and not any(values[first_absent:])


@pytest.mark.kvm
def test_caps_json():
    present = json.loads(vlab("caps", "--json").stdout)
    everything = json.loads(vlab("caps", "--json", "--all").stdout)
    assert set(everything) == {cap.name for cap in Cap}
    assert present == {name: value for name, value in everything.items() if value}
    assert present["USER_MEMORY"] > 0


@pytest.fixture
def no_kvm(monkeypatch, tmp_path):
    """This process sees no KVM device: $VLAB_KVM_DEVICE names a missing file."""
    missing = tmp_path / "kvm"
    monkeypatch.setenv(DEVICE_ENV, str(missing))
    return missing


def test_doctor_without_kvm_gives_the_hint_and_picks_tcg(no_kvm, capsys):
    status = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert f"NOT USABLE  cannot open {no_kvm}: ENOENT" in out
    assert " ".join(hint_for("open", errno.ENOENT).split()) in " ".join(out.split())
    assert "auto: tcg" in out
    assert "capabilities" not in out  # none can be asked without the device
    unicorn = importlib.util.find_spec("unicorn") is not None
    assert status == (0 if unicorn else 1)


def test_doctor_says_which_exit_path_runs(capsys, monkeypatch):
    built = vcpu_module._exitpath is not None
    cli.main(["doctor"])
    out = capsys.readouterr().out
    assert re.search(r"^  ok +exit path .*compiled" if built else r"^  python +exit path", out,
                     re.MULTILINE)
    monkeypatch.setattr(vcpu_module, "_exitpath", None)
    cli.main(["doctor"])
    out = " ".join(capsys.readouterr().out.split())
    assert "python exit path" in out and "decoded in Python" in out and "python3-dev" in out


def test_doctor_says_which_run_loop_runs(capsys, monkeypatch):
    monkeypatch.setattr(runloop_module, "_runloop", None)
    cli.main(["doctor"])
    out = " ".join(capsys.readouterr().out.split())
    assert "python exit path" in out and "runs its Python loop" in out and "python3-dev" in out


def test_doctor_says_how_tcg_hooks_are_called(capsys, monkeypatch):
    engine = pytest.importorskip("vlab.accel.tcg.engine", reason="no Unicorn: no tcg")
    if engine._insnhooks is not None and runloop_module._runloop is not None:
        cli.main(["doctor"])
        out = " ".join(capsys.readouterr().out.split())
        assert "the run loop's C handling the debug console" in out
    monkeypatch.setattr(engine, "_insnhooks", None)
    cli.main(["doctor"])
    out = " ".join(capsys.readouterr().out.split())
    assert "python exit path" in out and "through ctypes" in out and "python3-dev" in out
    assert "the run loop's C handling" not in out


def test_doctor_fails_when_neither_kvm_nor_tcg_can_run(no_kvm, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "unicorn", None)  # `import unicorn` now fails
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^  MISSING +unicorn .*pip install unicorn", out, re.MULTILINE)
    assert "cannot run here" in out


def test_caps_without_kvm_fails_with_the_hint(no_kvm, capsys):
    assert cli.main(["caps"]) == 1
    err = capsys.readouterr().err
    assert f"cannot open {no_kvm}" in err and hint_for("open", errno.ENOENT) in err


def test_every_registered_command_is_a_subcommand(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert {"doctor", "caps"} <= set(cli.COMMANDS)
    assert all(re.search(rf"^    {name}( |$)", out, re.MULTILINE) for name in cli.COMMANDS)
