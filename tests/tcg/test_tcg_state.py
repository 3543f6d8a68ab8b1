"""The tcg accelerator's tables and bookkeeping: CPUID, MSRs, stats, VM and accelerator."""
from __future__ import annotations

import pytest

from vlab.accel import select
from vlab.accel.tcg import TcgAccelerator, supported_cpuid
from vlab.accel.tcg.cpuid import CpuidAnswers
from vlab.kvm.exits import Hlt, IoIn, IoOut, MmioWrite
from vlab.kvm.state import CpuidEntry
from vlab.machine.memory import GuestMemory


def leaf(function, index=0):
    return CpuidAnswers(supported_cpuid()).lookup(function, index)


def test_supported_cpuid_is_a_qemu64_like_model():
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf(0)[1], leaf(0)[3], leaf(0)[2]))
    assert vendor == b"AuthenticAMD"
    edx1 = leaf(1)[3]
    for bit in (0, 3, 4, 5, 6, 9, 15, 25, 26):  # FPU PSE TSC MSR PAE APIC CMOV SSE SSE2
        assert edx1 & 1 << bit
    edx_ext = leaf(0x80000001)[3]
    for bit in (11, 20, 29):                    # SYSCALL NX LM
        assert edx_ext & 1 << bit
    brand = b"".join(r.to_bytes(4, "little") for f in range(0x80000002, 0x80000005)
                     for r in leaf(f))
    assert brand.rstrip(b"\0") == b"QEMU Virtual CPU version 2.5+"
    assert leaf(0x80000008)[0] & 0xFF == 40


def test_cpuid_lookup_follows_kvm():
    intel = CpuidAnswers([CpuidEntry(0, eax=4, ebx=0x756E6547, edx=0x49656E69, ecx=0x6C65746E),
                        CpuidEntry(2, eax=0x22),
                        CpuidEntry(4, index=1, flags=1, eax=0x41),
                        CpuidEntry(0x80000000, eax=0x80000001)])
    assert intel.lookup(4, 1)[0] == 0x41
    assert intel.lookup(4, 0) == (0, 0, 0, 0)        # the index matters for this leaf
    assert intel.lookup(2, 7)[0] == 0x22              # and not for that one
    assert intel.lookup(9, 1)[0] == 0x41              # past the basic range: highest leaf
    assert intel.lookup(0x80000005, 1)[0] == 0x41     # past the extended range too
    assert CpuidAnswers(supported_cpuid()).lookup(9, 0) == (0, 0, 0, 0)  # not on AMD
    assert CpuidAnswers().lookup(0, 0) == (0, 0, 0, 0)


def test_msrs_round_trip_and_the_guest_reads_them(guest):
    g = guest("""
        mov ecx, 0xC0000081
        rdmsr
        mov [0x500], eax
        mov [0x504], edx
        hlt
    """, "long")
    values = {0xC0000081: 0x0023001000000000 | 0x1234, 0xC0000082: 0xFFFF800000001000}
    assert g.vcpu.set_msrs(values) == 2
    assert g.vcpu.get_msrs(list(values)) == values
    assert g.vcpu.set_msrs({0x174: 8, 0x12345678: 1, 0x175: 2}) == 1  # stops at the unknown
    assert g.vcpu.get_msrs([0x174, 0x12345678, 0x175]) == {0x174: 8}
    assert isinstance(g.run(), Hlt)
    assert g.memory.read_u64(0x500) == values[0xC0000081]
    efer = g.vcpu.get_msrs([0xC0000080])[0xC0000080]
    assert efer == g.vcpu.get_sregs().efer == 0x500


def test_complete_rdmsr_is_refused(guest):
    g = guest("hlt")
    with pytest.raises(ValueError, match="no RDMSR exits"):
        g.vcpu.complete_rdmsr(None, 0)


def test_stats_count_what_run_returned(guest):
    g = guest("""
        out 0x80, al
        out 0x80, al
        in al, 0x60
        mov byte [dword 0xE0000000], 1
        hlt
    """)
    stats = g.vcpu.get_stats_fd()
    before = stats.read_raw()
    exits = g.run_until(Hlt)
    assert [type(e) for e in exits] == [IoOut, IoOut, IoIn, MmioWrite, Hlt]
    delta = stats.delta(before, stats.read_raw())
    assert {k: delta[k] for k in ("exits", "io_exits", "mmio_exits", "halt_exits")} == {
        "exits": 5, "io_exits": 3, "mmio_exits": 1, "halt_exits": 1}
    assert delta["emu_starts"] >= 5
    assert stats.names()[:4] == ["exits", "io_exits", "mmio_exits", "halt_exits"]
    assert stats.scalars(stats.read_raw()) == stats.read()


def test_vm_refuses_overlapping_memory_and_duplicate_vcpus():
    with GuestMemory() as memory, TcgAccelerator().create_vm() as vm:
        vm.map_memory(memory.add_ram(0, 0x10000))
        other = GuestMemory()
        with pytest.raises(ValueError, match="overlaps"):
            vm.map_memory(other.add_ram(0x8000, 0x10000, "more"))
        vm.map_memory(memory.add_mmio(0x10000, 0x1000))  # holes need no mapping
        vm.create_vcpu(0)
        with pytest.raises(ValueError, match="already exists"):
            vm.create_vcpu(0)
        vm.close()
        other.close()


def test_memory_mapped_after_the_vcpu_exists(guest):
    g = guest("""
        mov al, [dword 0x400000]
        out 0xE9, al
        hlt
    """)
    late = g.memory.add_ram(0x400000, 0x1000, "late")
    late.view[0] = 0x5A
    g.vm.map_memory(late)
    g.run_until(Hlt)
    assert g.output() == b"\x5a"


def test_select_gives_the_tcg_accelerator():
    accelerator = select("tcg")
    assert (accelerator.name, accelerator.reason) == ("tcg", "asked for tcg")
    assert accelerator.get_supported_cpuid() == supported_cpuid()
    accelerator.close()


def test_tcg_has_the_whole_accelerator_surface():
    from vlab.accel.base import AccelVcpu, AccelVm, Accelerator
    from vlab.accel.tcg import TcgVcpu, TcgVm

    def surface(protocol):
        return {name for name in vars(protocol) if not name.startswith("_")}

    for protocol, implementation in ((AccelVcpu, TcgVcpu), (AccelVm, TcgVm),
                                     (Accelerator, TcgAccelerator)):
        missing = {name for name in surface(protocol) - {"id", "name", "reason"}
                   if not hasattr(implementation, name)}
        assert not missing, (implementation.__name__, missing)
    assert TcgAccelerator.name == "tcg"


def test_the_machine_boots_the_examples_on_tcg(guest):
    """The run loop (`VcpuRunner`) drives a TcgVcpu as it drives KVM's: sync regs, stats
    descriptors, kicks, single-step."""
    from importlib import resources

    from vlab.machine.boot import boot
    from vlab.machine.examples import EXAMPLES
    for name, example in EXAMPLES.items():
        path = resources.files("vlab.machine").joinpath(example.source_path)
        result = boot(path, mode=example.mode, accel="tcg", timeout=10)
        assert (result.accel, result.output) == ("tcg", example.expected_output)
        assert result.result.stop_reason.startswith("HLT")
