"""One owner runs a vCPU at a time; Ctrl-C, `stop()`, `timeout=` and `close()` end a run from
anywhere, on kvm and tcg alike. Code that could crash the interpreter runs in `isolated`."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from vlab import Lab
from vlab.lab import StageError
from vlab.machine.runloop import RunResult, StepResult, VcpuBusy, VcpuHalted
from vlab.kvm import kvm_usable

SPIN = "spin: jmp spin"
ACCELS = [pytest.param("kvm", marks=pytest.mark.kvm), "tcg"]

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed")


@pytest.fixture(params=ACCELS)
def accel(request):
    return request.param


def spinning_lab(accel: str, **options) -> Lab:
    lab = Lab(accel=accel, **options)
    lab.load_assembly(SPIN)
    lab.bring_up()
    return lab


def test_ctrl_c_during_a_two_vcpu_run_stops_both_vcpus(accel, isolated):
    """Ctrl-C, once or twice in a row, at different moments of a 2-vCPU run: both vCPUs
    stop for it and no vCPU thread is left running."""
    done = isolated(f"""
        import os, signal, threading, vlab
        signal.signal(signal.SIGINT, lambda *_: None)   # a Ctrl-C after a run: not the test's
        lab = vlab.Lab(accel={accel!r}, vcpus=2)
        lab.load_assembly({SPIN!r})
        lab.bring_up()
        for i in range(16):
            for n in range(1 + i % 2):   # every other run gets a second Ctrl-C 1 ms later
                threading.Timer(0.02 + 0.01 * i + 0.001 * n, os.kill,
                                (os.getpid(), signal.SIGINT)).start()
            results = lab.run()
            left = [t.name for t in threading.enumerate() if t.name.startswith("CPU ")]
            assert [r.stop_reason for r in results] == ["interrupted by Ctrl-C"] * 2, results
            assert not left, left
        lab.close()
        print("ok")
    """, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


@pytest.mark.kvm
@pytest.mark.watchdog(20)
def test_step_of_a_vcpu_halted_with_interrupts_off_returns():
    """With the in-kernel irqchip, `cli; hlt` sleeps in KVM (KVM_MP_STATE_HALTED): a step
    says so instead of entering KVM_RUN, where nothing would ever wake the vCPU."""
    with Lab(accel="kvm", irqchip=True) as lab:
        lab.load_assembly("cli\nhlt\n")
        lab.bring_up()
        result = lab.run(timeout=0.5)
        assert result.stop_reason == "timeout after 0.5 s"
        with pytest.raises(VcpuHalted, match=r"halted .*interrupts off \(IF=0\)"):
            lab.step()
        assert lab.vcpus[0].get_regs().rip == result.rip   # nothing ran


@pytest.mark.kvm
@pytest.mark.watchdog(20)
def test_step_of_a_vcpu_waiting_for_an_interrupt_returns():
    """`sti; hlt` with no interrupt source: the step says the vCPU waits for an interrupt."""
    with Lab(accel="kvm", irqchip=True) as lab:
        lab.load_assembly("sti\nhlt\n")
        lab.bring_up()
        lab.run(timeout=0.3)
        with pytest.raises(VcpuHalted, match=r"waits for an interrupt \(IF=1\)"):
            lab.step()


def _run_in_background(lab: Lab) -> threading.Thread:
    thread = threading.Thread(target=lab.run, name="background run", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while lab.runners[0].busy is None and time.monotonic() < deadline:
        time.sleep(0.01)   # until the run owns the vCPU
    return thread


@pytest.mark.isolated   # on tcg, two threads in one Unicorn engine crash
@pytest.mark.watchdog(30)
def test_a_second_caller_gets_a_clear_error_while_a_run_is_in_progress(accel):
    with spinning_lab(accel) as lab:
        lab.run(timeout=0.05)   # the first run, kvm_cpu_exec, done
        thread = _run_in_background(lab)
        assert thread.is_alive()
        for call in (lab.run, lab.step, lab.snapshot, lambda: lab.run(vcpu=0),
                     lambda: lab.break_at(0x8000), lab.kvm_cpu_exec):
            with pytest.raises(VcpuBusy, match=r"busy: .* in thread 'background run'.*lab\.stop"):
                call()
        lab.stop()
        thread.join(10)
        assert not thread.is_alive()
        assert isinstance(lab.last_run, RunResult) and lab.last_run.stop_reason == "stopped"
        assert isinstance(lab.step(), StepResult)    # the owner is gone: the next caller runs


def test_a_cell_using_the_lab_while_the_stepper_runs_it(accel, isolated):
    """The widgets run the guest in a background thread: a cell's run(), step() or
    snapshot() is refused with a vlab error, and close() stops the run first and waits."""
    pytest.importorskip("ipywidgets")
    done = isolated(f"""
        import time, vlab
        from vlab.machine.runloop import VcpuBusy
        from vlab.widgets import Dashboard
        lab = vlab.Lab(accel={accel!r})
        lab.load_assembly({SPIN!r})
        lab.bring_up()
        board = Dashboard(lab)
        board.stepper.run()
        time.sleep(0.3)
        assert board.stepper.running
        for call in (lab.run, lab.step, lab.snapshot):
            try:
                call()
            except VcpuBusy as e:
                print("refused:", e)
        lab.close()
        assert board.stepper.wait(5), "the stepper's run did not end"
        print("stepper:", board.stepper.status_text)
        board.stepper.render()
        assert all(b.disabled for b in board.stepper.buttons)
        try:
            lab.run()
        except vlab.StageError as e:
            print("after close:", e)
    """, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["refused"] * 3 + ["stepper", "after close"]
    assert "the Lab was closed" in lines[3]
    assert "this Lab is closed" in lines[4]


@pytest.mark.isolated   # on tcg, two threads in one Unicorn engine crash
@pytest.mark.watchdog(30)
def test_the_stepper_stops_a_run_started_elsewhere(accel):
    pytest.importorskip("ipywidgets")
    from vlab.widgets import StageStepper
    with spinning_lab(accel) as lab:
        lab.run(timeout=0.05)
        stepper = StageStepper(lab)
        thread = _run_in_background(lab)
        stepper.step()
        assert "VcpuBusy" in stepper.status_text
        stepper.stop()
        thread.join(10)
        assert lab.last_run.stop_reason == "stopped from the stepper"


@pytest.mark.watchdog(30)
def test_a_two_vcpu_run_in_a_background_thread_stops(accel):
    """A widget runs a 2-vCPU Lab from its own thread, where no signal handler can be
    installed: stop() still ends both vCPUs."""
    with spinning_lab(accel, vcpus=2) as lab:
        lab.run(timeout=0.05)
        thread = _run_in_background(lab)
        lab.stop()
        thread.join(10)
        assert [r.stop_reason for r in lab.last_run] == ["stopped", "stopped"]


@pytest.mark.watchdog(30)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_a_stop_as_a_run_begins_is_not_lost(accel, vcpus):
    """stop() from another thread after lab.run() was called but before a vCPU's run
    loop begins (in its thread, with two vCPUs): the run stops for it."""
    with spinning_lab(accel, vcpus=vcpus) as lab:
        lab.run(timeout=0.05)
        for runner in lab.runners:
            def run_late(runner_run=runner.run, **options):
                stopper = threading.Thread(target=lab.stop)
                stopper.start()
                stopper.join()
                return runner_run(**options)
            runner.run = run_late
        result = lab.run()
        reasons = [r.stop_reason for r in (result if vcpus > 1 else [result])]
        assert reasons == ["stopped"] * vcpus


@pytest.mark.isolated   # on tcg, two threads in one Unicorn engine crash
@pytest.mark.watchdog(30)
def test_close_stops_a_run_in_another_thread_and_waits_for_it(accel):
    lab = spinning_lab(accel)
    lab.run(timeout=0.05)   # the first run, kvm_cpu_exec, done
    thread = _run_in_background(lab)
    lab.close()
    assert not thread.is_alive()
    assert lab.last_run.stop_reason == "the Lab was closed"


@pytest.mark.watchdog(30)
@pytest.mark.parametrize("options, message", [
    ({"timeout": "1"}, r"timeout='1': give a number of seconds"),
    ({"timeout": -1}, r"timeout=-1: give a number of seconds"),
    ({"max_exits": "3"}, r"max_exits='3': give a whole number"),
    ({"max_exits": 0}, r"max_exits=0: give a whole number"),
    ({"predicate": 5}, r"predicate=5: give a function"),
    ({"until": "HLT"}, r"until='HLT': give an ExitReason or an exit class"),
])
def test_run_options_are_checked_at_the_call(accel, options, message):
    """A bad option is refused before the guest runs (a timer thread that dies of a
    TypeError would leave a spinning guest running for ever)."""
    with spinning_lab(accel) as lab:
        with pytest.raises((TypeError, ValueError), match=message):
            lab.run(**options)
        assert lab.runners[0].busy is None
        assert lab.run(timeout=0.1).stop_reason == "timeout after 0.1 s"


def test_races_between_stop_step_run_and_close(accel, isolated):
    """Two threads call run, step, stop and close in random orders: every call ends with
    a decoded result or a vlab error, never a crash or a hang."""
    done = isolated(f"""
        import random, threading, vlab
        from vlab.machine.runloop import RunResult, StepResult, VcpuBusy
        rng = random.Random(13)
        outcomes = {{}}
        def call(lab, name):
            try:
                if name == "run":
                    result = lab.run(timeout=0.05)
                elif name == "step":
                    result = lab.step()
                elif name == "stop":
                    result = lab.stop()
                else:
                    result = lab.close()
                kind = type(result).__name__
            except (VcpuBusy, vlab.StageError) as e:
                kind = type(e).__name__
            except Exception as e:   # anything else fails the test, with what it was
                kind = f"{{type(e).__name__}}: {{e}}"
            outcomes[kind] = outcomes.get(kind, 0) + 1
        for round in range(25):
            lab = vlab.Lab(accel={accel!r}, vcpus=1 + round % 2)
            lab.load_assembly({SPIN!r})
            lab.bring_up()
            plans = [[rng.choice(["run", "run", "step", "stop", "close"]) for _ in range(4)]
                     for _ in range(2)]
            threads = [threading.Thread(target=lambda p=p: [call(lab, n) for n in p])
                       for p in plans]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
                assert not t.is_alive(), plans
            lab.close()
        print(sorted(outcomes))
    """, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = set(eval(done.stdout))
    assert kinds <= {"RunResult", "list", "StepResult", "NoneType", "VcpuBusy", "LabClosed"}
    assert {"RunResult", "StepResult", "VcpuBusy"} <= kinds


def test_a_second_ctrl_c_on_vlab_run_keeps_the_status_and_the_summary(accel, tmp_path):
    """The first Ctrl-C stops the guest; one more, right after, changes nothing: the
    process still exits with the run's status (1: interrupted) after the summary."""
    if accel == "kvm" and not kvm_usable()[0]:
        pytest.skip(kvm_usable()[1])
    guest = tmp_path / "spin.asm"
    guest.write_text("mov al, 'r'\nout 0xe9, al\nmov al, 10\nout 0xe9, al\n" + SPIN + "\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, "-m", "vlab.cli", "run", str(guest),
                                 "--accel", accel], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=root,
                                env={**os.environ, "PYTHONPATH": root})
        try:
            assert proc.stdout.readline() == "r\n"
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.001 * (attempt % 6))
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 1, (attempt, out, err)
        assert "stopped: interrupted by Ctrl-C" in out, (attempt, out, err)
