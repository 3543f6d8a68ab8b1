"""Every vlab.kvm wrapper against the real kernel, and small real-mode guests that check
themselves (kvm-hello-world style): what the guest did is asserted, not just that no ioctl
failed."""
from __future__ import annotations

import errno
import mmap

import pytest

from vlab.kvm import (Cap, CpuidEntry, Debug, DebugRegs, DTable, Hlt, IoIn, IoOut, KvmError,
                      MmioRead, MmioWrite, MpState, Regs, VcpuFd, VmFd, X86Rdmsr)
from vlab.kvm.abi import (KVM_API_VERSION, KVM_MEM_READONLY, KVM_MSR_EXIT_REASON_FILTER,
                          KVM_MSR_FILTER_READ, ffi)

from guestlib import ORG, host_address

IA32_TSC = 0x10
IA32_SYSENTER_CS = 0x174
IA32_TSC_AUX = 0xC0000103
DB_VECTOR = 1  # #DB, the exception single-step and hardware breakpoints raise


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


def test_hello_guest_exits_in_order(make_guest):
    guest = make_guest(HELLO)
    exits = guest.run_until(Hlt)
    assert exits == [IoOut(port=0xE9, size=1, count=1, data=bytes([c])) for c in b"Hello"] + [Hlt()]
    assert int.from_bytes(guest.memory[0x500:0x502], "little") == 42
    regs = guest.vcpu.get_regs()
    assert regs.rbx == 42
    assert regs.rip == ORG + guest.assembly.code.index(0xF4) + 1  # just past the HLT
    assert guest.vcpu.exit_reason == Hlt.reason


def test_in_answered_with_complete_io_in(make_guest):
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


def test_mmio_to_unbacked_memory_answered_with_complete_mmio_read(make_guest):
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
