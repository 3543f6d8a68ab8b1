"""Two vCPUs on real KVM: each created with its own runner and exit log, told apart by RBX,
run together in QEMU-named threads or stepped and run one at a time."""
from __future__ import annotations

import threading
import time

import pytest

from vlab.kvm import Hlt, IoOut
from vlab.lab import Lab

pytestmark = pytest.mark.kvm

TIMES = 3
# Every vCPU runs this; RBX (its index, set by kvm_arch_put_registers) picks the character it
# prints and the 16 bytes it stores to.
GUEST = f"""
    mov al, 'A'
    add al, bl
    mov cx, {TIMES}
again:
    out 0xe9, al
    loop again
    mov di, bx
    shl di, 4
    mov [di + 0x400], al
    hlt
"""


@pytest.fixture
def lab():
    """A 2-vCPU Lab brought up to reset, running GUEST."""
    with Lab(accel="kvm", vcpus=2) as lab:
        lab.load_assembly(GUEST)
        lab.bring_up()
        yield lab


def test_each_vcpu_is_created_with_its_own_runner_and_log():
    with Lab(accel="kvm", vcpus=2) as lab:
        lab.kvm_init()
        lab.x86_cpu_realizefn()
        record = lab.kvm_init_vcpu()
        creates = [r for r in record.ioctls if r.name == "CREATE_VCPU"]
        assert [c.args for c in creates] == ["id=0", "id=1"]
        assert [c.result for c in creates] == [v.fd for v in lab.vcpus]
        assert [v.id for v in lab.vcpus] == [0, 1] and lab.vcpus[0].fd != lab.vcpus[1].fd
        assert [r.vcpu for r in lab.runners] == lab.vcpus
        assert lab.runners[0] is not lab.runners[1]
        assert [r.log for r in lab.runners] == lab.exit_logs
        assert lab.exit_logs[0] is not lab.exit_logs[1]
        assert [m.vcpu_id for m in lab.registers] == [0, 1]
        assert record.after["vCPUs"] == [f"vcpu{v.id} fd={v.fd}" for v in lab.vcpus]
        assert any("'CPU n/KVM' threads" in n for n in record.notes)
        arch = lab.kvm_arch_init_vcpu()
        assert [r.vcpu_id for r in arch.ioctls if r.name == "SET_CPUID2"] == [0, 1]


def test_reset_gives_each_vcpu_its_index_in_rbx(lab):
    put = lab.records["kvm_arch_put_registers"]
    assert [r.vcpu_id for r in put.ioctls if r.name == "SET_REGS"] == [0, 1]
    assert [v.get_regs().rbx for v in lab.vcpus] == [0, 1]
    assert [v.get_regs().rip for v in lab.vcpus] == [0x8000, 0x8000]
    assert lab.vcpus[0].get_regs().rsp != lab.vcpus[1].get_regs().rsp
    assert "rbx=0x1 " in put.after["vcpu1 registers"]


def test_run_runs_both_in_cpu_n_kvm_threads_with_a_trace_each(lab):
    threads: list[set[str]] = [set(), set()]
    for i, log in enumerate(lab.exit_logs):
        log.subscribe(lambda record, i=i: threads[i].add(threading.current_thread().name))
    results = lab.run()
    assert [type(r.last_exit) for r in results] == [Hlt, Hlt]
    assert threads == [{"CPU 0/KVM"}, {"CPU 1/KVM"}]
    assert sorted(lab.console) == ["A"] * TIMES + ["B"] * TIMES
    assert lab.memory(0x400, 1) == b"A" and lab.memory(0x410, 1) == b"B"
    for i, log in enumerate(lab.exit_logs):
        assert {r.vcpu for r in log} == {i}
        assert log.histogram() == {"IO out": TIMES, "HLT": 1}
        assert [r.exit.data for r in log if isinstance(r.exit, IoOut)] == [bytes([65 + i])] * TIMES
    assert lab.exits(1) is lab.exit_logs[1]
    record = lab.records["kvm_cpu_exec"]
    assert {r.vcpu_id for r in record.ioctls if r.name == "RUN"} == {0, 1}
    assert record.notes[-1].startswith("vcpu0: stopped: HLT") and "; vcpu1: stopped: HLT" in record.notes[-1]
    assert [m.current.regs.rip for m in lab.registers] == [r.rip for r in results]


def test_each_vcpu_steps_and_runs_on_its_own(lab):
    step = lab.step(vcpu=1)
    assert (step.rip_before, step.rip_after) == (0x8000, 0x8002)   # mov al, 'A'
    assert lab.vcpus[0].get_regs().rip == 0x8000
    assert lab.registers[1].current.regs.rip == 0x8002 and lab.registers[0].current.regs.rip == 0x8000
    result = lab.run(vcpu=1)
    assert isinstance(result.last_exit, Hlt) and lab.console == "B" * TIMES
    assert lab.memory(0x410, 1) == b"B" and lab.memory(0x400, 1) == b"\0"
    assert lab.exits(0).total == 0 and lab.exits(1).histogram()["HLT"] == 1
    assert lab.vcpus[0].get_regs().rip == 0x8000
    result = lab.run(vcpu=0)
    assert isinstance(result.last_exit, Hlt)
    assert lab.console == "B" * TIMES + "A" * TIMES and lab.memory(0x400, 1) == b"A"
    assert {r.vcpu for r in lab.exits(0)} == {0}


def test_stop_interrupts_both_threads(lab):
    lab.load_assembly("jmp $\n")
    timer = threading.Timer(0.2, lab.stop, ("stopped by the test",))
    timer.start()
    results = lab.run()
    timer.join()
    assert [r.stop_reason for r in results] == ["stopped by the test"] * 2
    assert all(r.rip == 0x8000 for r in results)


def test_an_error_in_a_vcpu_thread_stops_the_others_and_reaches_the_caller(lab):
    lab.load_assembly("jmp $\n")

    def broken(**options):
        raise RuntimeError("vCPU 1 failed")

    lab.runners[1].run = broken
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="vCPU 1 failed"):
        lab.run(timeout=10)
    assert time.perf_counter() - started < 10  # the error stopped vCPU 0, not the timeout
    assert not any(t.name.startswith("CPU ") for t in threading.enumerate())
