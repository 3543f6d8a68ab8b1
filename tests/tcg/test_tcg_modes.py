"""Every CPU mode on the tcg vCPU: the example guests, special registers, mode switches."""
from __future__ import annotations

import struct

import pytest

from vlab.kvm.exits import Hlt, IoOut, MmioRead, MmioWrite
from vlab.machine.cpu_modes import (DEFAULT_LAYOUT, SEL_CODE32, SEL_DATA, CpuMode, build_gdt,
                                    setup_mode)
from vlab.machine.examples import EXAMPLES

from tcglib import RAM_SIZE


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_guest(guest, name):
    example = EXAMPLES[name]
    g = guest(example.source(), example.mode)
    exits = g.run_until(Hlt)
    assert all(isinstance(e, IoOut) for e in exits[:-1])
    assert g.output() == example.expected_output
    for gpa, data in example.expected_memory.items():
        assert g.memory.read(gpa, len(data)) == data
    regs = g.vcpu.get_regs()
    assert {name: getattr(regs, name) for name in example.expected_regs} == example.expected_regs


@pytest.mark.parametrize("mode", list(CpuMode))
def test_sregs_read_back_as_set(guest, mode):
    g = guest("hlt", mode)
    wanted = setup_mode(mode, g.vcpu.get_sregs(), g.memory, ram_size=RAM_SIZE).sregs
    assert g.vcpu.get_sregs() == wanted
    assert isinstance(g.run(), Hlt)
    assert g.vcpu.get_sregs() == wanted


def test_fresh_vcpu_is_in_the_reset_state(guest):
    from vlab.accel.tcg import TcgAccelerator
    with TcgAccelerator().create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        sregs, regs = vcpu.get_sregs(), vcpu.get_regs()
    assert (sregs.cs.selector, sregs.cs.base, regs.rip) == (0xF000, 0xFFFF0000, 0xFFF0)
    assert (sregs.cr0, sregs.efer, regs.rflags) == (0x60000010, 0, 0x2)


def test_guest_enters_protected_mode_by_itself(guest):
    g = guest(f"""
        cli
        lgdt [gdtr]
        mov eax, cr0
        or al, 1
        mov cr0, eax
        jmp dword {SEL_CODE32}:protected
    bits 32
    protected:
        mov ax, {SEL_DATA}
        mov ds, ax
        mov ss, ax
        mov esp, 0x7000
        push 0x12345678
        pop eax
        hlt
    gdtr:
        dw 0x2f
        dd {DEFAULT_LAYOUT.gdt}
    """)
    g.memory.write(DEFAULT_LAYOUT.gdt, build_gdt())
    assert isinstance(g.run(), Hlt)
    sregs = g.vcpu.get_sregs()
    assert sregs.cr0 & 1
    cs = sregs.cs
    assert (cs.selector, cs.db, cs.limit, cs.g) == (SEL_CODE32, 1, 0xFFFFFFFF, 1)
    assert (sregs.ss.selector, sregs.ss.db) == (SEL_DATA, 1)
    assert (sregs.gdt.base, sregs.gdt.limit) == (DEFAULT_LAYOUT.gdt, 0x2F)
    assert g.vcpu.get_regs().rax == 0x12345678


def test_long_mode_rom_and_mmio_exits_give_guest_physical_addresses(guest):
    """Paging maps virtual 4 MiB (2 MiB page) to the ROM's 2 MiB and 6 MiB to a hole at
    20 MiB: the exits name the physical addresses, as KVM's do."""
    g = guest("""
        mov byte [0x500001], 0x99
        mov eax, [0x600010]
        mov [0x500], eax
        hlt
    """, "long", rom=(0x300000, b"\x11\x22"))
    page_directory = DEFAULT_LAYOUT.page_tables + 0x2000
    g.memory.write(page_directory + 2 * 8, struct.pack("<Q", 0x200000 | 0x87))
    g.memory.write(page_directory + 3 * 8, struct.pack("<Q", 0x1400000 | 0x87))
    write = g.run()
    assert isinstance(write, MmioWrite) and (write.address, write.data) == (0x300001, b"\x99")
    read = g.run()
    assert isinstance(read, MmioRead) and (read.address, read.length) == (0x1400010, 4)
    g.vcpu.complete_mmio_read(read, b"\x04\x03\x02\x01")
    assert isinstance(g.run(), Hlt)
    assert g.memory.read_u32(0x500) == 0x01020304
    assert g.memory.read(0x300000, 2) == b"\x11\x22"


def test_set_regs_drops_code_the_host_replaced(guest):
    """TCG notices the guest rewriting code, not the host: set_regs drops translations."""
    g = guest("mov al, 1\nout 0xE9, al\nhlt")
    assert g.run_until(Hlt) and g.output() == b"\x01"
    g.memory.write(g.assembly.org + 1, b"\x02")        # mov al, 2
    g.vcpu.set_regs(g.vcpu.get_regs().replace(rip=g.assembly.org))
    g.run_until(Hlt)
    assert g.output() == b"\x01\x02"


def test_guest_rewriting_its_own_code_runs_the_new_code(guest):
    g = guest("""
        mov byte [patch + 1], 9
    patch:
        mov al, 1
        out 0xE9, al
        hlt
    """)
    g.run_until(Hlt)
    assert g.output() == b"\x09"
