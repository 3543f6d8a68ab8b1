"""`vlab.Lab(accel="tcg")`: the whole bring-up and the run, step, breakpoint and snapshot
controls on the software accelerator, where no ioctl is made and each record says what
Unicorn did instead."""
from __future__ import annotations

import shutil

import pytest

from vlab.lab.stages import STAGES
from vlab.machine.examples import EXAMPLES, RESULT_GPA

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed")

WRITER = """
    mov word [0x600], 0x1234    ; store
    mov word [0x2600], 0x5678
    out 0xE9, al
    hlt
"""


@pytest.fixture
def labs(make_lab):
    """Labs on the software accelerator."""
    return lambda **options: make_lab(accel="tcg", **options)


@pytest.mark.parametrize("mode", ["real", "protected", "paged", "long"])
def test_every_stage_says_what_tcg_did_in_place_of_the_ioctls(labs, mode):
    lab = labs(mode=mode)
    lab.bring_up()
    record = lab.kvm_cpu_exec()
    assert list(lab.records) == [stage.name for stage in STAGES]
    for name, stage_record in lab.records.items():
        assert stage_record.accel == "tcg" and stage_record.ioctls == [], name
        assert stage_record.actions, f"{name} records nothing done in place of its ioctls"
        assert "in place of ioctls (software accelerator):" in str(stage_record)
    assert "uc_open" in lab.records["kvm_init"].actions[-1]
    assert "KVM_SET_SREGS" in lab.records["kvm_arch_put_registers"].actions[0]
    starts = int(record.actions[0].split("uc_emu_start() ")[1].split()[0])
    histogram = lab.exits().histogram()
    # port I/O is handled inside emulation: only the other exits (the HLT) ended a uc_emu_start
    assert histogram["IO out"] > 0
    assert starts == lab.exits().total - histogram["IO out"] == 1
    assert lab.last_run.stop_reason.startswith("HLT")
    assert lab.console == EXAMPLES[mode].expected_output.decode()
    assert lab.memory(RESULT_GPA, 4) == (42).to_bytes(4, "little")
    assert lab.stages[-1]["status"] == "done"


def test_step_and_step_back_undo_registers_and_memory(labs):
    lab = labs()
    lab.bring_up()
    lab.load_assembly(WRITER)
    first = lab.step()
    assert first.rip_before == 0x8000 and lab.memory(0x600, 2) == b"\x34\x12"
    lab.step()
    assert lab.memory(0x2600, 2) == b"\x78\x56"
    assert lab.step_back().regs.rip == first.rip_after
    assert lab.memory(0x2600, 2) == bytes(2) and lab.memory(0x600, 2) == b"\x34\x12"
    assert lab.step_back().regs.rip == 0x8000
    assert lab.memory(0x600, 2) == bytes(2)
    result = lab.run()
    assert result.stop_reason.startswith("HLT") and lab.memory(0x2600, 2) == b"\x78\x56"


def test_step_stops_at_hlt(labs):
    lab = labs()
    lab.bring_up()
    lab.load_assembly("hlt\nmov ax, 1\nhlt")
    step = lab.step()
    assert step.exit.describe().startswith("HLT") and step.rip_after == 0x8001


def test_breakpoint_stops_the_run_and_resumes_past_it(labs):
    lab = labs()
    lab.bring_up()
    stop = lab.memory(0x8000, 0x40).index(b"\xe6\xe9") + 0x8000  # the first `out 0xE9, al`
    lab.break_at(stop)
    hit = lab.run()
    assert hit.stop_reason == f"breakpoint 0 at {stop:#x}" and hit.rip == stop
    assert lab.console == ""
    lab.break_at()
    assert lab.run().stop_reason.startswith("HLT") and lab.console == "Hello from real mode\n"


def test_snapshot_and_restore_run_the_guest_again(labs):
    lab = labs(mode="long")
    lab.bring_up()
    snapshot = lab.snapshot()
    lab.run()
    lab.machine.memory.write(RESULT_GPA, bytes(4))
    lab.restore(snapshot)
    assert lab.vcpus[0].get_regs().rip == 0x8000
    lab.run()
    assert lab.console == "Hello from long mode\n" * 2
    assert lab.memory(RESULT_GPA, 4) == (42).to_bytes(4, "little")


def test_two_vcpus_run_in_their_own_threads(labs):
    lab = labs(vcpus=2)
    lab.bring_up()
    results = lab.run()
    assert [r.stop_reason for r in results] == ["HLT: the guest halted"] * 2
    assert sorted(lab.console) == sorted("Hello from real mode\n" * 2)  # interleaved


def test_irqchip_is_refused_in_the_record(labs):
    lab = labs(irqchip=True)
    record = lab.kvm_init()
    assert any("irqchip=True not honoured" in action for action in record.actions)


def test_a_masked_feature_is_what_the_guest_sees(labs):
    lab = labs(cpu="qemu64")
    lab.kvm_init()
    lab.x86_cpu_realizefn()
    lab.cpuid.set_feature("sse4_2", False)
    lab.bring_up()
    entry = lab.cpuid.find(1)
    assert lab.guest_cpuid(1)["ecx"] == entry.ecx and not entry.ecx & 1 << 20
