"""Every vlab.kvm wrapper against the real kernel, and small real-mode guests that check
themselves (kvm-hello-world style): what the guest did is asserted, not just that no ioctl
failed."""
from __future__ import annotations

import contextlib
import errno
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlab.kvm import (Cap, CpuidEntry, Debug, DebugRegs, DTable, Hlt, Interrupted, Ioctl, IoIn,
                      IoOut, Kvm, KvmError, KvmUnavailable, MmioRead, MmioWrite, MpState, Regs,
                      VcpuFd, VmFd, X86Rdmsr, detect_backend, kvm_usable)
from vlab.kvm.abi import (KVM_API_VERSION, KVM_MEM_READONLY, KVM_MSR_EXIT_REASON_FILTER,
                          KVM_MSR_FILTER_READ, ffi)

from guestlib import ORG, host_address

REPO = str(Path(__file__).resolve().parents[2])
IA32_TSC = 0x10
IA32_SYSENTER_CS = 0x174
IA32_TSC_AUX = 0xC0000103
DB_VECTOR = 1  # #DB, the exception single-step and hardware breakpoints raise
CR0_PE, CR0_PG = 1 << 0, 1 << 31


def u32(buffer, offset: int) -> int:
    return int.from_bytes(buffer[offset:offset + 4], "little")


# --- the system fd ----------------------------------------------------------------------------
def test_get_api_version(kvm):
    assert kvm.get_api_version() == KVM_API_VERSION == 12


def test_check_extension_on_kvm_and_vm(kvm):
    assert kvm.check_extension(Cap.USER_MEMORY) > 0
    assert kvm.check_extension(2**20) == 0  # a capability no kernel defines
    with kvm.create_vm() as vm:
        assert vm.check_extension(Cap.USER_MEMORY) > 0
        assert vm.check_extension(Cap.NR_MEMSLOTS) > 1
        assert 1 <= kvm.check_extension(Cap.NR_VCPUS) <= vm.check_extension(Cap.MAX_VCPUS)


def test_capabilities_names_every_cap_with_its_value(kvm):
    caps = kvm.capabilities()
    assert list(caps) == list(Cap)
    assert all(isinstance(value, int) and value >= 0 for value in caps.values())
    assert caps[Cap.USER_MEMORY] > 0
    for cap in (Cap.USER_MEMORY, Cap.NR_MEMSLOTS, Cap.MAX_VCPUS, Cap.HYPERV):
        assert caps[cap] == kvm.check_extension(cap)


def test_get_vcpu_mmap_size(kvm):
    size = kvm.get_vcpu_mmap_size()
    assert size >= 4096 and size % mmap.PAGESIZE == 0
    assert size >= ffi.sizeof("struct kvm_run")
    assert kvm.vcpu_mmap_size == size


def test_get_supported_cpuid(kvm):
    entries = kvm.get_supported_cpuid()
    leaves = {(e.function, e.index): e for e in entries}
    assert len(leaves) == len(entries) > 0
    leaf0 = leaves[(0, 0)]
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert vendor.decode("ascii").isprintable()
    with open("/proc/cpuinfo") as cpuinfo:
        host_vendor = next(line.split(":")[1].strip() for line in cpuinfo
                           if line.startswith("vendor_id"))
    assert vendor.decode() == host_vendor
    basic = [e.function for e in entries if e.function < 0x40000000]
    assert max(basic) <= leaf0.eax
    extended = [e.function for e in entries if e.function >= 0x80000000]
    assert max(extended) <= leaves[(0x80000000, 0)].eax


def test_get_supported_cpuid_with_a_too_small_buffer(kvm):
    with pytest.raises(KvmError) as caught:
        kvm.get_supported_cpuid(max_entries=1)
    assert (caught.value.errno, caught.value.ioctl) == (errno.E2BIG, "GET_SUPPORTED_CPUID")
    assert "larger nent" in str(caught.value)


def test_msr_index_lists_and_feature_msrs(kvm):
    saved = kvm.get_msr_index_list()
    assert len(set(saved)) == len(saved)
    assert {IA32_TSC, IA32_SYSENTER_CS} <= set(saved)
    features = kvm.get_msr_feature_index_list()
    assert len(set(features)) == len(features)
    assert set(kvm.get_msrs(features)) == set(features)


def test_create_vm(kvm):
    with kvm.create_vm() as first, kvm.create_vm() as second:
        assert isinstance(first, VmFd) and first.fd >= 0 and first.fd != second.fd
        assert first.kvm is kvm and first.vcpus == []


# --- the VM fd --------------------------------------------------------------------------------
def test_overlapping_memory_slot_is_eexist_with_hint(kvm):
    memory = mmap.mmap(-1, 0x10000)
    with kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, 0x10000, host_address(memory))
        with pytest.raises(KvmError) as caught:
            vm.set_user_memory_region(1, 0x8000, 0x8000, host_address(memory))
        assert (caught.value.errno, caught.value.ioctl) == (errno.EEXIST, "SET_USER_MEMORY_REGION")
        assert "overlaps" in caught.value.hint and caught.value.hint in str(caught.value)
        vm.set_user_memory_region(1, 0x10000, 0x8000, host_address(memory))  # adjacent is fine
    memory.close()


def test_readonly_slot_turns_guest_writes_into_mmio_writes(make_guest):
    guest = make_guest("mov byte [0x2000], 7\nmov al, [0x2001]\nhlt", slot_flags=KVM_MEM_READONLY)
    guest.memory[0x2001] = 0x5A
    exits = guest.run_until(Hlt)
    assert exits == [MmioWrite(address=0x2000, length=1, data=b"\x07"), Hlt()]
    assert guest.memory[0x2000] == 0  # the write never reached the memory
    assert guest.vcpu.get_regs().rax & 0xFF == 0x5A  # reads are served from it


def test_set_tss_addr(kvm):
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        with pytest.raises(KvmError) as caught:
            vm.set_tss_addr(0xFFFFF000)  # its three pages would wrap past 4 GiB
        assert (caught.value.errno, caught.value.ioctl) == (errno.EINVAL, "SET_TSS_ADDR")


def test_set_identity_map_addr_only_before_vcpus(kvm):
    with kvm.create_vm() as vm:
        vm.set_identity_map_addr(0xFFFBC000)
        vm.create_vcpu(0)
        with pytest.raises(KvmError) as caught:
            vm.set_identity_map_addr(0xFFFBC000)
        assert caught.value.ioctl == "SET_IDENTITY_MAP_ADDR"


def test_irqchip_pit_irq_line_and_lapic(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as no_chip:
            vm.irq_line(4, 1)
        assert (no_chip.value.errno, no_chip.value.ioctl) == (errno.ENXIO, "IRQ_LINE")
        with pytest.raises(KvmError) as pit_first:
            vm.create_pit2()
        assert pit_first.value.ioctl == "CREATE_PIT2"
        vm.create_irqchip()
        vm.create_pit2()
        for duplicate in (vm.create_irqchip, vm.create_pit2):
            with pytest.raises(KvmError) as caught:
                duplicate()
            assert caught.value.errno == errno.EEXIST
        vm.irq_line(4, 1)
        vm.irq_line(4, 0)
        for vcpu_id in (0, 1):
            lapic = vm.create_vcpu(vcpu_id).get_lapic()
            assert len(lapic) == 1024
            assert u32(lapic, 0x20) >> 24 == vcpu_id  # APIC ID register
            assert 0x10 <= u32(lapic, 0x30) & 0xFF <= 0x15  # version: an integrated APIC


def test_get_lapic_without_irqchip_fails_naming_it(kvm):
    with kvm.create_vm() as vm, pytest.raises(KvmError) as caught:
        vm.create_vcpu(0).get_lapic()
    assert caught.value.ioctl == "GET_LAPIC"


def test_user_space_rdmsr_through_an_msr_filter(kvm, make_guest):
    if not (kvm.check_extension(Cap.X86_USER_SPACE_MSR) and kvm.check_extension(Cap.X86_MSR_FILTER)):
        pytest.skip("KVM_CAP_X86_USER_SPACE_MSR / KVM_CAP_X86_MSR_FILTER are absent")
    guest = make_guest(f"""
        mov ecx, {IA32_TSC_AUX:#x}
        rdmsr
        mov [0x800], eax
        mov [0x804], edx
        mov ecx, {IA32_SYSENTER_CS:#x}
        rdmsr
        hlt""")
    guest.vm.enable_cap(Cap.X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER)
    guest.vm.set_msr_filter([(KVM_MSR_FILTER_READ, IA32_TSC_AUX, 1, b"\x00")])  # deny: exit
    guest.vcpu.set_msrs({IA32_SYSENTER_CS: 0x99})
    exit = guest.vcpu.run()
    assert exit == X86Rdmsr(index=IA32_TSC_AUX, msr_reason=KVM_MSR_EXIT_REASON_FILTER)
    guest.vcpu.complete_rdmsr(exit, 0x11223344_55667788)
    assert guest.run_until(Hlt) == [Hlt()]  # the unfiltered MSR stays inside KVM
    assert u32(guest.memory, 0x800) == 0x55667788 and u32(guest.memory, 0x804) == 0x11223344
    assert guest.vcpu.get_regs().rax == 0x99


def test_stats_fds_of_vm_and_vcpu(make_guest):
    guest = make_guest("mov cx, 50\n.l: out 0x80, al\nloop .l\nhlt")
    with guest.vm.get_stats_fd() as vm_stats, guest.vcpu.get_stats_fd() as vcpu_stats:
        assert vm_stats.id.startswith("kvm-") and vm_stats.names()
        assert vcpu_stats.id == f"{vm_stats.id}/vcpu-0"
        assert "exits" in vcpu_stats.names()
        assert set(vm_stats.read()) == set(vm_stats.names())
        before = vcpu_stats.read_raw()
        exits = guest.run_until(Hlt)
        delta = vcpu_stats.delta(before, vcpu_stats.read_raw())
    assert len(exits) == 51
    assert delta["exits"] >= 1


# --- the vCPU fd ------------------------------------------------------------------------------
def test_create_vcpu_maps_kvm_run(kvm):
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(3)
        assert isinstance(vcpu, VcpuFd) and vcpu.id == 3 and vm.vcpus == [vcpu]
        assert vcpu.mmap_size == kvm.get_vcpu_mmap_size()
        with pytest.raises(KvmError) as caught:
            vm.create_vcpu(3)
        assert (caught.value.errno, caught.value.ioctl) == (errno.EEXIST, "CREATE_VCPU")
        assert "already exists" in caught.value.hint


@pytest.fixture
def vcpu(kvm):
    with kvm.create_vm() as vm:
        yield vm.create_vcpu(0)


def test_regs_round_trip(vcpu):
    regs = Regs(*range(0x1111, 0x1111 * 17, 0x1111), rip=0xFFF0, rflags=0x2 | 0x1 | 0x40)
    vcpu.set_regs(regs)
    assert vcpu.get_regs() == regs


def test_sregs_round_trip(vcpu):
    sregs = vcpu.get_sregs()
    changed = sregs.replace(ds=sregs.ds.replace(base=0x1230, selector=0x123),
                            gdt=DTable(0x5000, 0x27), idt=DTable(0x6000, 0x3FF), cr2=0xDEAD000)
    vcpu.set_sregs(changed)
    assert vcpu.get_sregs() == changed != sregs


def test_fpu_round_trip(vcpu):
    fpu = vcpu.get_fpu()
    fpu.update(fcw=0x27F, fsw=0x100, ftwx=0x3, last_opcode=0x1D9, last_ip=0x1234, last_dp=0x5678)
    fpu["fpr"][0] = bytes(range(10)) + bytes(6)
    fpu["xmm"][15] = bytes(range(16))
    vcpu.set_fpu(fpu)
    got = vcpu.get_fpu()
    # x86 KVM_GET_FPU/KVM_SET_FPU do not move MXCSR (QEMU moves it with KVM_GET_XSAVE).
    del fpu["mxcsr"], got["mxcsr"]
    assert got == fpu


def test_msrs_round_trip(vcpu):
    values = {IA32_TSC_AUX: 0x1234, IA32_SYSENTER_CS: 0x10}
    assert vcpu.set_msrs(values) == 2
    assert vcpu.get_msrs(list(values)) == values


def test_msrs_kvm_does_not_know_are_refused_by_count(vcpu):
    assert vcpu.set_msrs({0xDEAD0000: 1}) == 0
    assert vcpu.get_msrs([0xDEAD0000]) == {}


def test_set_cpuid2_get_cpuid2_and_what_the_guest_sees(kvm, make_guest):
    vendor = b"VlabVlabVlab"
    table = [e.replace(ebx=u32(vendor, 0), edx=u32(vendor, 4), ecx=u32(vendor, 8))
             if (e.function, e.index) == (0, 0) else e for e in kvm.get_supported_cpuid()]
    guest = make_guest("xor eax, eax\ncpuid\nmov [0x800], ebx\nmov [0x804], edx\n"
                       "mov [0x808], ecx\nhlt")
    guest.vcpu.set_cpuid2(table)
    got = {(e.function, e.index): e for e in guest.vcpu.get_cpuid2()}
    assert set(got) == {(e.function, e.index) for e in table}
    assert got[(0, 0)] == table[0]
    # KVM rewrites leaf 1 (APIC ID, OSXSAVE) and 0xd (XSAVE sizes) itself; kvm_pvm also
    # reports the host's feature bits for 7. The extended leaves come back as given.
    extended = [e for e in table if e.function >= 0x80000000]
    assert extended and all(got[(e.function, e.index)] == e for e in extended)
    guest.run_until(Hlt)
    assert guest.memory[0x800:0x80C] == vendor


def test_too_many_cpuid_entries_is_e2big_with_hint(vcpu):
    with pytest.raises(KvmError) as caught:
        vcpu.set_cpuid2([CpuidEntry(0x40000100 + i) for i in range(257)])
    assert (caught.value.errno, caught.value.ioctl) == (errno.E2BIG, "SET_CPUID2")
    assert "at most 256" in str(caught.value)


def test_tsc_khz(kvm, vcpu):
    khz = vcpu.get_tsc_khz()
    assert khz > 0
    if kvm.check_extension(Cap.TSC_CONTROL):
        vcpu.set_tsc_khz(khz // 2)
        assert vcpu.get_tsc_khz() == khz // 2
    else:
        with pytest.raises(KvmError) as caught:
            vcpu.set_tsc_khz(khz // 2)
        assert caught.value.ioctl == "SET_TSC_KHZ" and "KVM_SET_TSC_KHZ" in str(caught.value)


def test_single_step_gives_a_debug_exit_per_instruction(make_guest):
    guest = make_guest("mov ax, 1\nmov bx, 2\nmov cx, 3\nhlt")
    guest.vcpu.set_guest_debug(single_step=True)
    for rip, ax in ((ORG + 3, 1), (ORG + 6, 1)):
        exit = guest.vcpu.run()
        assert isinstance(exit, Debug) and (exit.exception, exit.pc) == (DB_VECTOR, rip)
        regs = guest.vcpu.get_regs()
        assert (regs.rip, regs.rax) == (rip, ax)
    guest.vcpu.set_guest_debug(enable=False)
    assert guest.run_until(Hlt) == [Hlt()]
    assert guest.vcpu.get_regs().rcx == 3


def test_single_stepped_hlt_and_an_out_exit_as_the_backend_states(make_guest):
    """VMX and SVM: a single-stepped HLT exits as HLT, and an OUT exit leaves RIP at the OUT
    until the next KVM_RUN completes it. kvm_pvm: the HLT is stepped over (one DEBUG exit
    past it) and the OUT exit already has RIP past it. See vlab.kvm.backend."""
    backend = detect_backend()
    guest = make_guest("hlt\nout 0x80, al\nhlt")
    guest.vcpu.set_guest_debug(single_step=True)
    exit = guest.vcpu.run()
    if backend.single_step_reports_hlt:
        assert isinstance(exit, Hlt), exit
    else:
        assert isinstance(exit, Debug) and exit.pc == ORG + 1, exit
    assert guest.vcpu.get_regs().rip == ORG + 1
    guest.vcpu.set_guest_debug(enable=False)
    assert guest.vcpu.run() == IoOut(port=0x80, size=1, count=1, data=b"\0")
    out_rip = {"at": ORG + 1, "past": ORG + 3}[backend.out_exit_rip]
    assert guest.vcpu.get_regs().rip == out_rip
    assert guest.vcpu.run() == Hlt() and guest.vcpu.get_regs().rip == ORG + 4


@pytest.mark.usefixtures("hardware_breakpoints")
def test_hardware_breakpoint(make_guest):
    guest = make_guest("mov ax, 1\nmov bx, 2\nmov cx, 3\nhlt")
    guest.vcpu.set_guest_debug(hw_breakpoints=(ORG + 6,))
    exit = guest.vcpu.run()
    assert isinstance(exit, Debug) and (exit.exception, exit.pc) == (DB_VECTOR, ORG + 6)
    assert exit.dr6 & 0b1111 == 0b0001  # B0: the breakpoint in DR0 fired
    assert guest.vcpu.get_regs().rbx == 2 and guest.vcpu.get_regs().rcx == 0
    with pytest.raises(ValueError, match="DR0-DR3"):
        guest.vcpu.set_guest_debug(hw_breakpoints=(1, 2, 3, 4, 5))


def test_vcpu_events_round_trip(vcpu):
    events = vcpu.get_vcpu_events()
    events["nmi"]["masked"] = 1
    vcpu.set_vcpu_events(events)
    assert vcpu.get_vcpu_events() == events


def test_mp_state_needs_the_in_kernel_lapic_to_halt(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as caught:
            vm.create_vcpu(0).set_mp_state(MpState.HALTED)
        assert (caught.value.errno, caught.value.ioctl) == (errno.EINVAL, "SET_MP_STATE")
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        assert vcpu.get_mp_state() is MpState.RUNNABLE
        vcpu.set_mp_state(MpState.HALTED)
        assert vcpu.get_mp_state() is MpState.HALTED


def test_debugregs_round_trip(vcpu):
    debugregs = DebugRegs(db=(0x1000, 0x2000, 0x3000, 0x4000), dr6=0xFFFF0FF1, dr7=0x455)
    vcpu.set_debugregs(debugregs)
    assert vcpu.get_debugregs() == debugregs


def test_xcrs_round_trip(kvm, vcpu):
    vcpu.set_cpuid2(kvm.get_supported_cpuid())  # XCR0 may only enable what CPUID 0xd offers
    xcrs = vcpu.get_xcrs()
    assert xcrs["nr_xcrs"] >= 1 and xcrs["xcrs"][0]["xcr"] == 0
    assert xcrs["xcrs"][0]["value"] & 1  # x87 state is always enabled
    xcrs["xcrs"][0]["value"] = 0b11      # x87 | SSE
    vcpu.set_xcrs(xcrs)
    assert vcpu.get_xcrs()["xcrs"][0]["value"] == 0b11


# --- guests that check themselves ---------------------------------------------------------------
HELLO = """
        mov si, msg
    .next:
        lodsb
        test al, al
        jz .done
        out 0xe9, al
        jmp .next
    .done:
        mov word [0x500], 42
        mov bx, 42
        hlt
    msg: db "Hello", 0
"""


def test_hello_guest_exits_in_order(make_guest, exit_path):
    guest = make_guest(HELLO)
    exits = guest.run_until(Hlt)
    assert exits == [IoOut(port=0xE9, size=1, count=1, data=bytes([c])) for c in b"Hello"] + [Hlt()]
    assert int.from_bytes(guest.memory[0x500:0x502], "little") == 42
    regs = guest.vcpu.get_regs()
    assert regs.rbx == 42
    assert regs.rip == ORG + guest.assembly.code.index(0xF4) + 1  # just past the HLT
    assert guest.vcpu.exit_reason == Hlt.reason


def test_in_answered_with_complete_io_in(make_guest, exit_path):
    guest = make_guest("""
        mov eax, 0x12345678
        in al, 0x60
        mov [0x600], eax
        in ax, 0x61
        mov [0x604], eax
        in eax, 0x62
        mov [0x608], eax
        cld
        mov di, 0x3000
        mov cx, 3
        mov dx, 0x70
        rep insb
        hlt""")
    answers = {0x60: b"\x11", 0x61: b"\x21\x22", 0x62: b"\x31\x32\x33\x34", 0x70: b"abc"}
    exits = []
    while not isinstance(exit := guest.vcpu.run(), Hlt):
        exits.append(exit)
        guest.vcpu.complete_io_in(exit, answers[exit.port])
    assert exits == [IoIn(0x60, 1, 1, exits[0].data_offset), IoIn(0x61, 2, 1, exits[1].data_offset),
                     IoIn(0x62, 4, 1, exits[2].data_offset), IoIn(0x70, 1, 3, exits[3].data_offset)]
    assert [u32(guest.memory, a) for a in (0x600, 0x604, 0x608)] == \
        [0x12345611, 0x12342221, 0x34333231]
    assert guest.memory[0x3000:0x3004] == b"abc\x00"
    assert guest.vcpu.get_regs().rax == 0x34333231


def test_complete_io_in_refuses_the_wrong_length(make_guest):
    guest = make_guest("in ax, 0x61\nhlt")
    exit = guest.vcpu.run()
    with pytest.raises(ValueError, match="needs 2 bytes, got 1"):
        guest.vcpu.complete_io_in(exit, b"\x01")


def test_mmio_to_unbacked_memory_answered_with_complete_mmio_read(make_guest, exit_path):
    guest = make_guest("""
        mov ax, 0x2000          ; 0x20000 is past the 64 KiB slot
        mov ds, ax
        mov dword [0x10], 0xdeadbeef
        mov eax, [0x20]
        xor bx, bx
        mov ds, bx
        mov [0x700], eax
        hlt""")
    write = guest.vcpu.run()
    assert write == MmioWrite(address=0x20010, length=4, data=bytes.fromhex("efbeadde"))
    read = guest.vcpu.run()
    assert read == MmioRead(address=0x20020, length=4)
    with pytest.raises(ValueError, match="needs 4 bytes"):
        guest.vcpu.complete_mmio_read(read, b"\x01\x02")
    guest.vcpu.complete_mmio_read(read, b"\x01\x02\x03\x04")
    assert guest.run_until(Hlt) == [Hlt()]
    assert u32(guest.memory, 0x700) == 0x04030201 == guest.vcpu.get_regs().rax


# --- tracing: every ioctl through one choke point ------------------------------------------------
def test_recording_captures_a_vm_bring_up(kvm):
    memory = mmap.mmap(-1, 0x10000)
    with kvm.tracer.recording() as calls:
        vm = kvm.create_vm()
        vm.set_user_memory_region(0, 0, 0x10000, host_address(memory))
        vcpu = vm.create_vcpu(0)
        vcpu.set_regs(Regs(rip=ORG))
    try:
        assert [(c.fd_kind, c.name) for c in calls] == [
            ("system", "CREATE_VM"), ("vm", "SET_USER_MEMORY_REGION"), ("vm", "CREATE_VCPU"),
            ("system", "GET_VCPU_MMAP_SIZE"), ("vcpu", "SET_REGS")]
        assert [c.fd for c in calls] == [kvm.fd, vm.fd, vm.fd, kvm.fd, vcpu.fd]
        assert [c.request for c in calls] == [getattr(Ioctl, c.name) for c in calls]
        assert [c.trace_event for c in calls] == ["kvm_ioctl", "kvm_vm_ioctl", "kvm_vm_ioctl",
                                                  "kvm_ioctl", "kvm_vcpu_ioctl"]
        create_vm, region, create_vcpu, mmap_size, set_regs = calls
        assert (create_vm.result, create_vcpu.result) == (vm.fd, vcpu.fd)
        assert mmap_size.result == vcpu.mmap_size and set_regs.vcpu_id == 0
        assert f"slot=0 gpa=0x0 size=0x10000 hva={host_address(memory):#x}" == region.args
        assert create_vcpu.args == "id=0" and set_regs.args.startswith(f"rip={ORG:#x}")
        assert all(c.errno is None and 0 < c.duration_s < 1 for c in calls)
        assert str(region).startswith("     vm KVM_SET_USER_MEMORY_REGION(slot=0 ")
        assert str(set_regs).startswith("  vcpu0 KVM_SET_REGS(")
        vm.check_extension(Cap.USER_MEMORY)
        assert len(calls) == 5  # nothing is recorded after the block
    finally:
        vm.close()
        memory.close()


def test_a_failing_ioctl_is_recorded_with_its_errno(kvm):
    with kvm.create_vm() as vm, kvm.tracer.recording() as calls:
        with pytest.raises(KvmError):
            vm.set_user_memory_region(0, 0x1001, 0x1000, 0)
    (record,) = calls
    assert (record.name, record.result, record.errno) == ("SET_USER_MEMORY_REGION", None, errno.EINVAL)
    assert ") -> EINVAL " in str(record)


def test_kvm_run_is_recorded_when_someone_listens(make_guest):
    guest = make_guest(HELLO)
    with guest.vcpu.tracer.recording() as calls:
        exits = guest.run_until(Hlt)
    runs = [c for c in calls if c.name == "RUN"]
    assert len(runs) == len(calls) == len(exits) == 6
    assert all((c.fd_kind, c.vcpu_id, c.result, c.fd) == ("vcpu", 0, 0, guest.vcpu.fd) for c in runs)


def test_each_kvm_has_its_own_tracer_inherited_by_its_fds(kvm):
    with Kvm() as other, other.create_vm() as other_vm, kvm.create_vm() as vm, \
            kvm.tracer.recording() as calls:
        vcpu = vm.create_vcpu(0)
        assert vm.tracer is vcpu.tracer is kvm.tracer is not other.tracer
        other_vm.create_vcpu(0).get_regs()   # another Kvm's VM: not recorded here
        vcpu.get_regs()
    assert [(c.fd_kind, c.name) for c in calls] == [
        ("vm", "CREATE_VCPU"), ("system", "GET_VCPU_MMAP_SIZE"), ("vcpu", "GET_REGS")]


def test_subscribe_until_unsubscribed(kvm):
    seen = []
    unsubscribe = kvm.tracer.subscribe(seen.append)
    try:
        kvm.get_api_version()
    finally:
        unsubscribe()
    kvm.get_api_version()
    assert [(r.name, r.result) for r in seen] == [("GET_API_VERSION", 12)]


# --- stopping a running vCPU --------------------------------------------------------------------
SPIN_UNTIL_FLAG = """
    spin:
        cmp byte [0x500], 0
        je spin
        out 0xe9, al
        hlt
"""


def test_kick_stops_a_runaway_guest_in_another_thread_and_it_resumes(make_guest, exit_path):
    guest = make_guest(SPIN_UNTIL_FLAG)
    spin_end = ORG + guest.assembly.code.index(0xE6)  # the OUT after the loop
    outcome = {}

    def vcpu_thread():
        outcome["exit"] = guest.vcpu.run()
        outcome["returned"] = time.perf_counter()

    thread = threading.Thread(target=vcpu_thread, daemon=True)
    thread.start()
    time.sleep(0.2)  # well inside KVM_RUN by now, and no exit comes on its own
    assert thread.is_alive()
    kicked = time.perf_counter()
    guest.vcpu.kick(thread.ident)
    thread.join(5)
    assert not thread.is_alive(), "KVM_RUN did not return after kick()"
    latency = outcome["returned"] - kicked
    print(f"kick latency: {latency * 1e3:.3f} ms")
    assert outcome["exit"] == Interrupted()  # the guest never exits on its own
    assert ORG <= guest.vcpu.get_regs().rip < spin_end
    assert not guest.vcpu.immediate_exit  # cleared, so the next run really runs
    guest.memory[0x500] = 1
    exits = guest.run_until(Hlt)
    assert [type(e) for e in exits] == [IoOut, Hlt] and exits[0].port == 0xE9


def test_kick_before_run_makes_the_next_run_return_at_once(make_guest, exit_path):
    guest = make_guest("out 0xe9, al\nhlt")
    guest.vcpu.kick()
    assert guest.vcpu.immediate_exit
    assert guest.vcpu.run() == Interrupted()
    assert guest.vcpu.get_regs().rip == ORG
    assert [type(e) for e in guest.run_until(Hlt)] == [IoOut, Hlt]


# --- error paths --------------------------------------------------------------------------------
def closed_fds():
    kvm = Kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vm.close()  # closes the vCPU too
    kvm.close()
    return kvm, vm, vcpu


@pytest.mark.kvm
@pytest.mark.parametrize("listening", [False, True], ids=["untraced", "traced"])
def test_every_fd_kind_after_close_raises_ebadf_naming_the_ioctl(listening, exit_path):
    kvm, vm, vcpu = closed_fds()
    assert kvm.closed and vm.closed and vcpu.closed
    calls = [(kvm.get_api_version, "GET_API_VERSION"), (kvm.create_vm, "CREATE_VM"),
             (kvm.get_supported_cpuid, "GET_SUPPORTED_CPUID"),
             (lambda: vm.create_vcpu(1), "CREATE_VCPU"), (vm.create_irqchip, "CREATE_IRQCHIP"),
             (vm.get_stats_fd, "GET_STATS_FD"), (vcpu.get_regs, "GET_REGS"),
             (lambda: vcpu.set_regs(Regs()), "SET_REGS"), (vcpu.get_fpu, "GET_FPU"),
             (vcpu.run, "RUN")]
    with kvm.tracer.recording() if listening else contextlib.nullcontext():
        for call, name in calls:
            with pytest.raises(KvmError) as caught:
                call()
            assert (caught.value.errno, caught.value.ioctl) == (errno.EBADF, name)
            assert "closed" in caught.value.hint


@pytest.mark.kvm
def test_closed_fds_never_reach_a_reused_fd_number():
    """The kernel hands a closed fd's number to the next open: a closed object must not
    send its ioctls to whatever now owns that number."""
    with Kvm() as kvm:
        vm = kvm.create_vm()
        old_vcpu = vm.create_vcpu(0)
        number = old_vcpu.fd
        old_vcpu.close()
        new_vcpu = vm.create_vcpu(1)
        assert new_vcpu.fd == number  # POSIX: the lowest free number
        with pytest.raises(KvmError) as caught:
            old_vcpu.get_regs()
        assert caught.value.errno == errno.EBADF
        number = vm.fd
        vm.close()
        other_vm = kvm.create_vm()
        assert other_vm.fd == number
        with pytest.raises(KvmError) as caught:
            vm.create_vcpu(0)
        assert caught.value.errno == errno.EBADF and other_vm.vcpus == []
        other_vm.close()


CLOSED_KVM_RUN = """
from vlab.kvm import Kvm, KvmError, IoIn, MmioRead, X86Rdmsr
kvm = Kvm()
vm = kvm.create_vm()
vcpu = vm.create_vcpu(0)
vm.close()
touches = {
    "exit_reason": lambda: vcpu.exit_reason,
    "kvm_run.exit_reason": lambda: vcpu.kvm_run.exit_reason,
    "kvm_run.io.port": lambda: vcpu.kvm_run.io.port,
    "immediate_exit": lambda: vcpu.immediate_exit,
    "immediate_exit=": lambda: setattr(vcpu, "immediate_exit", True),
    "kick": lambda: vcpu.kick(),
    "synced_rip": lambda: vcpu.synced_rip,
    "complete_io_in": lambda: vcpu.complete_io_in(IoIn(0x60, 1, 1, 4096), b"x"),
    "complete_mmio_read": lambda: vcpu.complete_mmio_read(MmioRead(0x1000, 1), b"x"),
    "complete_rdmsr": lambda: vcpu.complete_rdmsr(X86Rdmsr(0x10), 1),
    "run": lambda: vcpu.run(),
}
for name, touch in touches.items():
    try:
        touch()
        print(name, "no error")
    except KvmError as e:
        print(name, e.ioctl, e.errno)
"""


@pytest.mark.kvm
def test_touching_kvm_run_after_close_raises_and_never_crashes():
    proc = subprocess.run([sys.executable, "-c", CLOSED_KVM_RUN], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr  # a touch of unmapped memory would be SIGSEGV
    lines = proc.stdout.splitlines()
    assert len(lines) == 11
    assert all(line.split()[1:] == ["RUN", str(errno.EBADF)] for line in lines), proc.stdout


def test_misaligned_memory_slot_is_einval_with_hint(kvm):
    with kvm.create_vm() as vm, pytest.raises(KvmError) as caught:
        vm.set_user_memory_region(0, 0x1001, 0x1000, 0)
    assert (caught.value.errno, caught.value.ioctl) == (errno.EINVAL, "SET_USER_MEMORY_REGION")
    assert "page aligned" in str(caught.value)


def test_cr0_pg_without_pe_is_refused_with_hint(vcpu):
    sregs = vcpu.get_sregs()
    with pytest.raises(KvmError) as caught:
        vcpu.set_sregs(sregs.replace(cr0=(sregs.cr0 & ~CR0_PE) | CR0_PG))
    assert (caught.value.errno, caught.value.ioctl) == (errno.EINVAL, "SET_SREGS")
    assert "CR0.PG without PE" in caught.value.hint and "KVM_SET_SREGS" in str(caught.value)
    assert vcpu.get_sregs() == sregs


def test_missing_device_is_kvm_unavailable_with_the_enoent_hint(tmp_path):
    missing = tmp_path / "kvm"
    with pytest.raises(KvmUnavailable) as caught:
        Kvm(str(missing))
    assert (caught.value.errno, caught.value.ioctl) == (errno.ENOENT, "open")
    assert str(missing) in str(caught.value) and "modprobe" in caught.value.hint
    usable, why = kvm_usable(str(missing))
    assert not usable and caught.value.hint in why


def test_a_file_that_is_not_kvm_opens_but_its_ioctls_are_enotty(tmp_path):
    impostor = tmp_path / "kvm"
    impostor.write_bytes(b"")
    with Kvm(str(impostor)) as kvm, pytest.raises(KvmError) as caught:
        kvm.get_api_version()
    assert (caught.value.errno, caught.value.ioctl) == (errno.ENOTTY, "GET_API_VERSION")
    assert "wrong fd kind" in caught.value.hint
    assert kvm_usable(str(impostor))[0] is False


AS_NOBODY = """
import os, sys
from vlab.kvm import Kvm, KvmUnavailable
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
try:
    Kvm(sys.argv[1])
except KvmUnavailable as e:
    print(e.errno, e.ioctl)
    print(e.hint)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
def test_no_permission_is_kvm_unavailable_with_the_eacces_hint(tmp_path):
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    device.chmod(0)
    proc = subprocess.run([sys.executable, "-c", AS_NOBODY, str(device)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    status, hint = proc.stdout.splitlines()
    assert status == f"{errno.EACCES} open"
    assert "usermod -aG kvm" in hint
