"""The exits a guest makes on the tcg vCPU, in the order and with the state KVM gives."""
from __future__ import annotations

import pytest

from vlab.accel.tcg import supported_cpuid
from vlab.kvm.abi import InternalErrorSuberror
from vlab.kvm.exits import (Hlt, InternalError, IoIn, IoOut, MmioRead, MmioWrite, Shutdown)

HELLO = """
    mov si, msg
next:
    lodsb
    test al, al
    jz done
    out 0xE9, al
    jmp next
done:
    mov dword [0x400], 42
    mov eax, 42
    hlt                     ; hlt
    jmp done
msg: db "hello", 0
"""


def test_real_mode_hello_exits_in_order(guest):
    g = guest(HELLO)
    exits = g.run_until(Hlt)
    assert [type(e) for e in exits] == [IoOut] * 5 + [Hlt]
    assert [(e.port, e.size, e.count) for e in exits[:-1]] == [(0xE9, 1, 1)] * 5
    assert g.output() == b"hello"
    assert g.memory.read_u32(0x400) == 42
    regs = g.vcpu.get_regs()
    assert regs.rax == 42
    assert regs.rip == g.address_of("hlt") + 1  # as KVM: RIP after the HLT


def test_out_exit_leaves_rip_after_the_out(guest):
    g = guest("""
        mov al, 1
        out 0x80, al
        mov bl, 2           ; after
        hlt
    """)
    assert isinstance(g.run(), IoOut)
    regs = g.vcpu.get_regs()
    assert regs.rip == g.address_of("after")
    assert regs.rbx & 0xFF == 0  # the next instruction has not run


def test_in_is_answered_by_complete_io_in(guest):
    g = guest("""
        mov ah, 0x77
        in al, 0x60
        mov [0x500], ax
        mov dx, 0x61
        in ax, dx
        mov [0x502], ax
        mov eax, 0xFFFFFFFF
        in eax, dx
        mov [0x504], eax
        hlt
    """)
    answers = [b"\x11", b"\x22\x33", b"\x44\x55\x66\x77"]
    seen = []
    while not isinstance(exit := g.run(), Hlt):
        assert isinstance(exit, IoIn)
        seen.append((exit.port, exit.size))
        g.vcpu.complete_io_in(exit, answers[len(seen) - 1])
    assert seen == [(0x60, 1), (0x61, 2), (0x61, 4)]
    assert g.memory.read(0x500, 8) == bytes.fromhex("1177 2233 44556677")  # AH kept


def test_complete_io_in_checks_the_length(guest):
    g = guest("in ax, 0x60\nhlt")
    exit = g.run()
    with pytest.raises(ValueError, match="needs 2 bytes"):
        g.vcpu.complete_io_in(exit, b"\x01")


def test_rep_ins_exits_once_per_element(guest):
    g = guest("""
        mov di, 0x600
        mov cx, 3
        mov dx, 0x70
        cld
        rep insb
        hlt
    """)
    for value in (0xA1, 0xA2, 0xA3):
        exit = g.run()
        assert isinstance(exit, IoIn) and (exit.port, exit.count) == (0x70, 1)
        g.vcpu.complete_io_in(exit, bytes([value]))
    assert isinstance(g.run(), Hlt)
    assert g.memory.read(0x600, 4) == b"\xa1\xa2\xa3\x00"
    assert g.vcpu.get_regs().rcx & 0xFFFF == 0


def test_rep_outs_exits_once_per_element(guest):
    g = guest("""
        mov si, data
        mov cx, 3
        mov dx, 0xE9
        cld
        rep outsb
        hlt
    data: db "abc"
    """)
    exits = g.run_until(Hlt)
    assert [type(e) for e in exits] == [IoOut] * 3 + [Hlt]
    assert g.output() == b"abc"


MMIO = 0xD0000000


def test_mmio_read_exits_before_the_load_and_completes_after(guest):
    g = guest(f"""
        mov eax, [dword {MMIO:#x}]  ; load
        mov [0x500], eax
        hlt
    """)
    exit = g.run()
    assert isinstance(exit, MmioRead) and (exit.address, exit.length) == (MMIO, 4)
    assert g.vcpu.get_regs().rip == g.address_of("load")  # as KVM: the load is pending
    g.vcpu.complete_mmio_read(exit, b"\x78\x56\x34\x12")
    assert isinstance(g.run(), Hlt)
    assert g.memory.read_u32(0x500) == 0x12345678


def test_mmio_write_exits_after_the_store(guest):
    g = guest(f"""
        mov dword [dword {MMIO + 8:#x}], 0xCAFE
        mov bl, 1                   ; after
        hlt
    """)
    exit = g.run()
    assert isinstance(exit, MmioWrite)
    assert (exit.address, exit.length, exit.value) == (MMIO + 8, 4, 0xCAFE)
    assert g.vcpu.get_regs().rip == g.address_of("after")
    assert isinstance(g.run(), Hlt)
    assert g.vcpu.get_regs().rbx & 0xFF == 1


def test_read_modify_write_on_mmio_reads_then_writes_once(guest):
    g = guest(f"""
        add dword [dword {MMIO:#x}], 5
        hlt
    """)
    read = g.run()
    assert isinstance(read, MmioRead)
    g.vcpu.complete_mmio_read(read, (10).to_bytes(4, "little"))
    write = g.run()
    assert isinstance(write, MmioWrite) and write.value == 15
    assert isinstance(g.run(), Hlt)
    assert [type(e) for e in g.exits] == [MmioRead, MmioWrite, Hlt]


def test_complete_mmio_read_refuses_a_read_nobody_is_waiting_for(guest):
    g = guest(f"mov eax, [dword {MMIO:#x}]\nhlt")
    exit = g.run()
    with pytest.raises(ValueError, match="needs 4 bytes"):
        g.vcpu.complete_mmio_read(exit, b"\x00")
    g.vcpu.complete_mmio_read(exit, bytes(4))
    g.run()
    with pytest.raises(ValueError, match="no MMIO read"):
        g.vcpu.complete_mmio_read(exit, bytes(4))


ROM = 0x300000


def test_store_to_rom_is_an_mmio_write_and_leaves_rom_unchanged(guest):
    g = guest(f"""
        mov byte [dword {ROM + 1:#x}], 0x99
        mov al, [dword {ROM + 1:#x}]        ; after
        mov [0x500], al
        hlt
    """, rom=(ROM, b"\x11\x22\x33\x44"))
    exit = g.run()
    assert isinstance(exit, MmioWrite)
    assert (exit.address, exit.data) == (ROM + 1, b"\x99")
    assert g.vcpu.get_regs().rip == g.address_of("after")
    assert isinstance(g.run(), Hlt)
    assert g.memory.read(ROM, 4) == b"\x11\x22\x33\x44"
    assert g.memory.read(0x500, 1) == b"\x22"  # the guest reads the ROM's own byte back


def test_guest_sees_the_cpuid_table_it_was_given(guest):
    g = guest("""
        mov eax, 0x80000001
        cpuid
        mov [0x500], edx
        xor eax, eax
        cpuid
        mov [0x504], ebx
        mov [0x508], edx
        mov [0x50c], ecx
        mov eax, 1
        cpuid
        mov [0x510], edx
        hlt
    """, "protected")
    lm = 1 << 29
    table = [e.replace(edx=e.edx & ~lm) if e.function == 0x80000001 else
             e.replace(ebx=0x62616C56, edx=0x62616C56, ecx=0x62616C56) if e.function == 0 else e
             for e in supported_cpuid()]
    g.vcpu.set_cpuid2(table)
    assert isinstance(g.run(), Hlt)
    ext_edx = g.memory.read_u32(0x500)
    assert not ext_edx & lm and ext_edx & 1 << 20  # LM masked, NX still there
    assert g.memory.read(0x504, 12) == b"VlabVlabVlab"
    leaf1 = next(e for e in supported_cpuid() if e.function == 1)
    assert g.memory.read_u32(0x510) == leaf1.edx
    assert g.vcpu.get_cpuid2() == table


@pytest.mark.parametrize("mode, source", [
    ("protected", "mov ax, 0x1234\nmov ds, ax\nhlt"),   # #GP: selector past the GDT
    ("long", "xor ecx, ecx\ndiv rcx\nhlt"),              # #DE
    ("long", "mov rax, [0x7fff0000]\nhlt"),              # #PF: not mapped
])
def test_exception_without_an_idt_is_a_triple_fault(guest, mode, source):
    g = guest(source, mode)  # setup_mode leaves an empty IDT
    assert isinstance(g.run(), Shutdown)
    assert g.vcpu.get_stats_fd().read()["shutdown_exits"] == 1


def test_real_mode_interrupt_goes_through_the_vector_table(guest):
    g = guest("""
        mov word [0x21*4], handler
        mov word [0x21*4+2], 0
        mov sp, 0x7000
        mov al, 5
        sti
        int 0x21
        out 0xE9, al
        pushf
        pop bx
        hlt
    handler:
        pushf
        pop cx
        add al, 10
        iret
    """)
    assert isinstance(g.run(), IoOut) and g.output() == bytes([15])
    assert isinstance(g.run(), Hlt)
    regs = g.vcpu.get_regs()
    assert not regs.rcx & 1 << 9   # IF clear in the handler
    assert regs.rbx & 1 << 9       # and back after IRET
    assert regs.rsp == 0x7000
    assert g.vcpu.get_stats_fd().read()["exception_injections"] == 1


def test_real_mode_vector_past_the_idt_limit_shuts_down(guest):
    g = guest("int 0x21\nhlt")
    sregs = g.vcpu.get_sregs()
    g.vcpu.set_sregs(sregs.replace(idt=sregs.idt.replace(limit=4 * 0x21)))
    assert isinstance(g.run(), Shutdown)


def test_protected_mode_exception_the_idt_covers_is_not_delivered(guest):
    g = guest("int 0x21\nhlt", "protected")
    sregs = g.vcpu.get_sregs()
    g.vcpu.set_sregs(sregs.replace(idt=sregs.idt.replace(limit=0x7FF)))
    exit = g.run()
    assert isinstance(exit, InternalError)
    assert exit.suberror == InternalErrorSuberror.DELIVERY_EV and exit.data == (0x21,)


def test_ins_into_mmio_reads_the_port_then_stores_to_the_device(guest):
    """QEMU's INS first stores a dummy 0 (so that it can be restarted after a fault): an
    MMIO destination sees that store, then the port's value."""
    g = guest(f"""
        mov edi, {MMIO:#x}
        mov dx, 0x60
        a32 insb
        hlt
    """)
    exits = []
    while not isinstance(exit := g.run(), Hlt):
        exits.append(exit)
        if isinstance(exit, IoIn):
            g.vcpu.complete_io_in(exit, b"\x5a")
    assert exits == [MmioWrite(MMIO, 1, b"\x00"), IoIn(0x60, 1, 1, 0), MmioWrite(MMIO, 1, b"\x5a")]
    assert g.vcpu.get_regs().rdi == MMIO + 1


def test_an_unaligned_mmio_store_exits_once_per_byte_and_completes(guest):
    """Unicorn splits it; each byte is one exit, then the instruction is done (no byte is
    reported twice, however the split pieces are ordered against the stop)."""
    g = guest("mov eax, 0x11223344\nmov esp, 0xffffffff\npush eax\nhlt", mode="protected")
    exits = g.run_until(Hlt)
    assert [(e.address, e.data) for e in exits[:-1]] == [
        (0xFFFFFFFB, b"\x44"), (0xFFFFFFFC, b"\x33"), (0xFFFFFFFD, b"\x22"), (0xFFFFFFFE, b"\x11")]
    assert g.vcpu.get_regs().rsp == 0xFFFFFFFB
