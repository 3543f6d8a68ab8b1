"""vlab.Lab on the real /dev/kvm: each stage's ioctls in QEMU's order, its record as text and
HTML, the state it changed, the stage graph's refusals, every CPU mode's example guest, and
breakpoints."""
from __future__ import annotations

import re

import pytest

from vlab.kvm import Cap, Hlt, MpState, Shutdown
from vlab.lab import STAGES, StageError
from vlab.machine.examples import EXAMPLES, RESULT_GPA

pytestmark = pytest.mark.kvm

QEMU_ORDER = [s.name for s in STAGES]
HELLO_REAL = "Hello from real mode\n"


def names(record) -> list[str]:
    return record.ioctl_names()


def assert_subsequence(wanted: list[str], got: list[str]) -> None:
    it = iter(got)
    assert all(name in it for name in wanted), f"{wanted} is not in order within {got}"


def address_of(assembly, label: str) -> int:
    """Guest address of the first instruction after the line holding `label`."""
    lines = assembly.source.splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip().startswith(label))
    return min(addr for addr, n in assembly.lines.items() if n > line)


# --- the full bring-up ---------------------------------------------------------------------------
def test_bring_up_issues_each_stage_s_ioctls_in_qemu_order(make_lab):
    lab = make_lab()
    records = [lab.next_stage() for _ in QEMU_ORDER]
    assert [r.name for r in records] == QEMU_ORDER == list(lab.records)
    init, realize, vcpu, arch, memory, put, run = records

    # QEMU 5.0's kvm_init: the version, the VM, the vCPU limits and required capabilities,
    # then kvm_arch_init (MSR lists, identity map, TSS)
    caps = [r.args.removeprefix("KVM_CAP_") for r in init.ioctls if r.name == "CHECK_EXTENSION"]
    assert caps == ["NR_VCPUS", "MAX_VCPUS", "USER_MEMORY", "DESTROY_MEMORY_REGION_WORKS",
                    "JOIN_MEMORY_REGIONS_WORKS", "SET_TSS_ADDR", "EXT_CPUID", "MP_STATE",
                    "GET_MSR_FEATURES", "SET_IDENTITY_MAP_ADDR"]
    assert [n for n in names(init) if n != "KVM_CHECK_EXTENSION"] == [
        "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST",
        "KVM_GET_MSR_FEATURE_INDEX_LIST", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_SET_TSS_ADDR"]
    assert names(init).index("KVM_CREATE_VM") < names(init).index("KVM_CHECK_EXTENSION")
    assert init.ioctls[-2].args == "0xfeffc000" and init.ioctls[-1].args == "0xfeffd000"
    assert init.ioctls[2].fd_kind == "vm" and init.ioctls[2].args == "KVM_CAP_NR_VCPUS"
    assert [r.fd_kind for r in init.ioctls][-2:] == ["vm", "vm"]

    assert names(realize) == ["KVM_GET_SUPPORTED_CPUID"]

    has_stats = lab.accel.kvm.check_extension(Cap.BINARY_STATS_FD) > 0
    assert names(vcpu) == ["KVM_CREATE_VCPU", "KVM_GET_VCPU_MMAP_SIZE"] + ["KVM_GET_STATS_FD"] * has_stats
    assert vcpu.ioctls[0].args == "id=0" and vcpu.ioctls[0].result == lab.vcpus[0].fd
    assert any(a.startswith(f"mmap(vcpu0 fd {lab.vcpus[0].fd}, ") for a in vcpu.actions)

    assert_subsequence(["KVM_GET_TSC_KHZ", "KVM_SET_CPUID2"], names(arch))
    set_cpuid = next(r for r in arch.ioctls if r.name == "SET_CPUID2")
    assert set_cpuid.args == f"nent={len(lab.cpuid.entries)}" and set_cpuid.vcpu_id == 0
    assert set(names(arch)) <= {"KVM_GET_MSRS", "KVM_GET_TSC_KHZ", "KVM_SET_CPUID2", "KVM_SET_MSRS"}

    assert names(memory) == ["KVM_SET_USER_MEMORY_REGION"]
    assert memory.ioctls[0].args.startswith("slot=0 gpa=0x0 size=0x1000000 ")

    assert_subsequence(["KVM_SET_SREGS", "KVM_SET_REGS"], names(put))
    set_regs = next(r for r in put.ioctls if r.name == "SET_REGS")
    assert set_regs.args.startswith("rip=0x8000 ")
    assert "KVM_RUN" not in names(put)

    runs = [r for r in run.ioctls if r.name == "RUN"]
    assert names(run)[0] == "KVM_RUN" and all(r.vcpu_id == 0 for r in runs)
    assert len(runs) == lab.last_run.exits == len(HELLO_REAL) + 1  # one `out` per byte, HLT
    assert isinstance(lab.last_run.last_exit, Hlt)
    assert lab.console == HELLO_REAL
    assert str(lab.last_run) in run.notes


def test_each_record_names_qemu_and_the_kernel_in_text_and_html(make_lab):
    lab = make_lab()
    records = [lab.next_stage() for _ in QEMU_ORDER]
    for record in records:
        stage, text, page = record.stage, str(record), record._repr_html_()
        for fact in (stage.name, stage.qemu_file, stage.qemu50, stage.kernel):
            assert fact in text, (stage.name, fact)
        for fact in (stage.name, stage.qemu_file, stage.kernel):
            assert fact.replace(">", "&gt;") in page, (stage.name, fact)
        for call in record.ioctls[:5]:
            assert f"KVM_{call.name}({call.args})" in text
            assert f"KVM_{call.name}" in page
        assert record.accel == "kvm" and record.seconds > 0
    assert "kvm-accel" in str(records[0]) and "X86CPU" in str(records[1])


def test_records_show_fds_slots_and_registers_change(make_lab):
    lab = make_lab()
    init, realize, vcpu, arch, memory, put = lab.bring_up()
    kvm_fd, vm_fd, vcpu_fd = lab.accel.kvm.fd, lab.vm.vm.fd, lab.vcpus[0].fd
    assert init.changes() == {"accelerator": (None, "kvm"), "/dev/kvm fd": (None, kvm_fd),
                              "VM fd": (None, vm_fd)}
    assert realize.changes() == {"CPUID entries": (None, len(lab.cpuid.entries))}
    created = vcpu.changes()
    assert created["vCPUs"] == (None, [f"vcpu0 fd={vcpu_fd}"])
    before, reset = created["vcpu0 registers"]
    assert before is None and reset.startswith("real mode, rip=0xfff0 ")  # the x86 reset vector
    assert arch.changes() == {}
    assert memory.changes() == {
        "memory slots": (None, ["slot 0: 0x0+0x1000000 ram"]),
        "devices": (None, ["debug-exit", "debugcon", "fw_cfg", "serial0", "testdev"])}
    assert put.changes() == {"vcpu0 registers": (reset, put.after["vcpu0 registers"])}
    assert put.after["vcpu0 registers"].startswith("real mode, rip=0x8000 rsp=0x8000 rbx=0x0 ")
    assert "state changed:" in str(put) and "rip=0x8000" in put._repr_html_()

    run = lab.kvm_cpu_exec()
    (start, end), = run.changes().values()
    assert "rip=0x8000 " in start and "rip=0x8000 " not in end


def test_long_mode_reset_shows_control_registers(make_lab):
    lab = make_lab(mode="long")
    put = lab.bring_up()[-1]
    after = put.after["vcpu0 registers"]
    assert after.startswith("long (64-bit) mode, rip=0x8000 ")
    assert "cr0=0x80000033 cr3=0x1000 efer=0x500" in after
    assert any(n.startswith("wrote PML4 at 0x1000") for n in put.notes)


def test_irqchip_adds_the_in_kernel_irqchip_and_pit_and_hlt_waits_in_the_kernel(make_lab):
    lab = make_lab(irqchip=True)
    init = lab.kvm_init()
    assert names(init)[-3:] == ["KVM_SET_IDENTITY_MAP_ADDR", "KVM_SET_TSS_ADDR", "KVM_CREATE_IRQCHIP"]
    assert any("kvm_irqchip_create" in n for n in init.notes)
    memory = lab.bring_up()[3]  # the PIT comes with the board's devices, after the RAM slot
    assert names(memory) == ["KVM_SET_USER_MEMORY_REGION", "KVM_CREATE_PIT2"]
    result = lab.run(timeout=0.3)
    assert result.stop_reason == "timeout after 0.3 s"
    assert lab.console == HELLO_REAL and lab.vcpus[0].get_mp_state() is MpState.HALTED


# --- the stage graph --------------------------------------------------------------------------
def test_stage_statuses_and_next_stage_follow_qemu_order(make_lab):
    lab = make_lab()
    for done in range(len(QEMU_ORDER)):
        assert [row["status"] for row in lab.stages] == \
            ["done"] * done + ["next"] + ["waiting"] * (len(QEMU_ORDER) - done - 1)
        assert lab.next_stage().name == QEMU_ORDER[done]
    assert [row["status"] for row in lab.stages] == ["done"] * len(QEMU_ORDER)
    with pytest.raises(StageError, match="every stage is done: use lab.run"):
        lab.next_stage()
    assert "[x] kvm_cpu_exec" in str(lab)


@pytest.mark.parametrize("done, call, first", [
    (1, "kvm_arch_init_vcpu", "x86_cpu_realizefn"),
    (2, "pc_memory_init", "kvm_init_vcpu"),
    (3, "kvm_arch_put_registers", "kvm_arch_init_vcpu"),
    (4, "kvm_arch_put_registers", "pc_memory_init"),
    (5, "kvm_cpu_exec", "kvm_arch_put_registers"),
])
def test_a_stage_out_of_order_names_the_stage_to_run_first(make_lab, done, call, first):
    lab = make_lab()
    for _ in range(done):
        lab.next_stage()
    with pytest.raises(StageError, match=rf"^{call} needs .*: call lab\.{first}\(\) first"):
        getattr(lab, call)()
    assert list(lab.records) == QEMU_ORDER[:done]
    assert lab.next_stage().name == first  # the advice is what next_stage() does


def test_more_vcpus_than_kvm_allows_is_refused_at_kvm_init(make_lab):
    lab = make_lab()
    lab.kvm_init()
    maximum = lab.accel.kvm.check_extension(Cap.MAX_VCPUS)
    too_many = make_lab(vcpus=maximum + 1)
    with pytest.raises(StageError, match=rf"vcpus={maximum + 1} exceeds the maximum KVM supports here \({maximum}\)"):
        too_many.kvm_init()  # kvm_init checks -smp against KVM_CAP_MAX_VCPUS, as QEMU does
    assert "kvm_init" not in too_many.records


def test_running_or_stepping_before_reset_is_refused(make_lab):
    lab = make_lab()
    for _ in range(5):
        lab.next_stage()
    for action in (lab.step, lab.run, lambda: lab.break_at(0x8000), lab.snapshot):
        with pytest.raises(StageError, match="kvm_arch_put_registers"):
            action()
    assert lab.exits().total == 0


@pytest.mark.parametrize("stage", QEMU_ORDER[:-1])
def test_a_stage_twice_is_refused(make_lab, stage):
    lab = make_lab()
    while stage not in lab.records:
        lab.next_stage()
    record = lab.records[stage]
    with pytest.raises(StageError, match=f"{stage} is already done; create a new Lab"):
        getattr(lab, stage)()
    assert lab.records[stage] is record


# --- every CPU mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(EXAMPLES))
def test_each_mode_runs_its_example_guest(make_lab, mode):
    lab = make_lab(mode=mode)
    lab.bring_up()
    result = lab.run()
    example = EXAMPLES[mode]
    if mode == "paged" and not lab.backend.runs_32bit_paging:
        assert isinstance(result.last_exit, Shutdown)
        assert result.stop_reason.startswith("SHUTDOWN")
        assert any("does not run 32-bit paging" in n for n in lab.records["kvm_arch_put_registers"].notes)
        assert lab.console == ""
        return
    assert isinstance(result.last_exit, Hlt) and result.stop_reason.startswith("HLT")
    assert lab.console.encode() == example.expected_output
    for gpa, data in example.expected_memory.items():
        assert lab.memory(gpa, len(data)) == data
    assert lab.vcpus[0].get_regs().rax == example.expected_regs["rax"]
    assert lab.registers[0].current.regs.rax == example.expected_regs["rax"]
    assert lab.exits().histogram() == {"IO out": len(example.expected_output), "HLT": 1}


def test_load_assembly_after_pc_memory_init_lands_in_guest_ram(make_lab):
    lab = make_lab()
    lab.bring_up()
    lab.load_assembly("mov al, 'x'\nout 0xe9, al\nmov word [0x400], 0xbeef\nhlt\n")
    assert lab.memory(0x8000, 2) == bytes.fromhex("b078")
    lab.run()
    assert lab.console == "x" and lab.memory(RESULT_GPA, 2) == (0xBEEF).to_bytes(2, "little")


# --- breakpoints ---------------------------------------------------------------------------------------
BREAK_GUEST = """
    mov al, 'a'
    out 0xe9, al
target:
    mov al, 'b'
    out 0xe9, al
    hlt
"""


@pytest.mark.usefixtures("hardware_breakpoints")
def test_break_at_stops_there_and_run_goes_on_to_hlt(make_lab):
    lab = make_lab()
    guest = lab.load_assembly(BREAK_GUEST)
    lab.bring_up()
    target = address_of(guest.assembly, "target:")
    assert target == 0x8004
    lab.break_at(target)
    stopped = lab.run()
    assert stopped.rip == target and lab.console == "a"
    assert re.fullmatch(rf"breakpoint 0 at {target:#x}", stopped.stop_reason)
    assert lab.registers[0].current.regs.rip == target
    finished = lab.run()
    assert isinstance(finished.last_exit, Hlt) and lab.console == "ab"


def test_break_at_with_no_address_clears_breakpoints(make_lab):
    lab = make_lab()
    lab.load_assembly(BREAK_GUEST)
    lab.bring_up()
    lab.break_at(0x8004)
    lab.break_at()
    assert isinstance(lab.run().last_exit, Hlt) and lab.console == "ab"
