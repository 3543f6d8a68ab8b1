"""Port I/O handled inside emulation on tcg (QEMU's TCG model): the run loop's records, stop
conditions, answers to IN and stops from another thread are those of the exit-per-access
loop, and of KVM where it can run."""
from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from boards import board, tcg_board  # noqa: F401 (fixtures)
from vlab.accel.tcg.portio import IoShape, NotPortIo, io_shape
from vlab.kvm import Hlt, IoIn, IoOut
from vlab.kvm.state import Segment
from vlab.machine.assembler import assemble
from vlab.machine.loaders import load_raw

# Every form of IN and OUT but the string ones (KVM moves a whole `rep outsb` in one exit),
# to the debug console, the UART and an unclaimed port; the LSR read is stored.
PORT_IO = {
    "real": """
        mov al, 'h'
        out 0xe9, al
        mov dx, 0xe9
        mov al, 'i'
        out dx, al
        mov dx, 0x3fd
        in al, dx
        mov [0x600], al
        in ax, 0x70
        mov [0x602], ax
        o32 out 0x80, eax
        hlt
    """,
    "long": """
        mov al, 'h'
        out 0xe9, al
        mov dx, 0xe9
        mov al, 'i'
        db 0x48, 0xee           ; out dx, al behind a REX prefix the CPU ignores
        mov dx, 0x3fd
        in al, dx
        mov [0x600], al
        in eax, 0x70
        mov [0x602], eax
        hlt
    """,
}


def transcript(board):
    result = board.runner.run()
    assert isinstance(result.last_exit, Hlt), result
    records = [(replace(r.exit, data_offset=0) if isinstance(r.exit, IoIn) else r.exit,
                r.rip, r.device, r.claimed) for r in board.machine.log.records]
    return records, board.machine.console.data, board.machine.memory.read(0x600, 8)


def past_each_out(records, guest):
    """`records` with each OUT's RIP moved past the instruction, where tcg and kvm_pvm report
    it; VMX and SVM report it at the OUT (Backend.out_exit_rip)."""
    cs = guest.vcpu.get_sregs().cs
    return [(exit, io_shape(guest.machine.read_physical(cs.base + rip, 15), cs).rip_after(rip, 0)
             if isinstance(exit, IoOut) else rip, *rest) for exit, rip, *rest in records]


@pytest.mark.parametrize("mode", PORT_IO)
def test_records_rips_and_answers_match_kvm(board, tcg_board, mode):
    guest = board(PORT_IO[mode], mode)
    on_kvm = transcript(guest)
    if guest.machine.backend.out_exit_rip == "at":
        on_kvm = (past_each_out(on_kvm[0], guest), *on_kvm[1:])
    on_tcg = transcript(tcg_board(PORT_IO[mode], mode))
    assert on_tcg == on_kvm
    records, console, memory = on_tcg
    assert console == b"hi" and memory[0] == 0x60  # LSR: transmitter empty
    assert all(isinstance(exit, (IoIn, IoOut)) for exit, *_ in records[:-1])


def test_emulation_is_entered_once_for_a_run_of_port_io(tcg_board):
    guest = tcg_board(PORT_IO["real"])
    before = guest.runner.kernel_counters()
    guest.runner.run()
    after = guest.runner.kernel_counters()
    assert after["io_exits"] - before["io_exits"] == 5 and guest.runner.backend.counts_io_exits
    assert after["exits"] - before["exits"] == 6
    assert after["emu_starts"] - before["emu_starts"] == 1  # ended by the HLT


def test_each_inline_record_counts_its_own_exit(tcg_board):
    """KVM's counters read after an exit include it: so do tcg's, handled inline or not."""
    guest = tcg_board(PORT_IO["real"])
    guest.runner.run()
    log = guest.machine.log
    deltas = [log.kernel_delta(record) for record in log.records]
    assert deltas == [{"exits": 1, "io_exits": 1}] * 5 + [{"exits": 1, "halt_exits": 1}]


def test_new_code_at_an_out_s_address_is_decoded_afresh(tcg_board):
    """A loader writes another program where an OUT was: its RIP is past the new one."""
    guest = tcg_board("out 0xe9, al\nhlt\n")
    guest.runner.run()
    assert guest.machine.log.records[0].rip == guest.assembly.org + 2
    again = assemble("out dx, al\nhlt\n", bits=16, org=guest.assembly.org)
    load_raw(guest.machine.memory, again.org, again.code)
    guest.machine.setup_cpu(guest.vcpu, "real", again.org)
    guest.runner.run()
    assert guest.machine.log.records[-2].rip == guest.assembly.org + 1


def test_max_exits_stops_right_after_the_access_then_resumes(tcg_board):
    guest = tcg_board(PORT_IO["real"])
    first = guest.runner.run(max_exits=1)
    assert first.last_exit == IoOut(0xE9, 1, 1, b"h")
    assert first.rip == guest.address("mov dx, 0xe9") == guest.machine.log.last.rip
    assert guest.machine.console.data == b"h"
    until_in = guest.runner.run(until=IoIn)
    assert until_in.exits == 2 and until_in.rip == guest.address("mov [0x600]")
    assert guest.vcpu.get_regs().rax & 0xFF == 0x60  # the IN it stopped on was answered
    rest = guest.runner.run()
    assert isinstance(rest.last_exit, Hlt) and rest.exits == 3
    assert guest.machine.console.data == b"hi"
    assert guest.machine.memory.read(0x600, 4) == b"\x60\x00\xff\xff"


def test_predicate_sees_each_inline_record(tcg_board):
    guest = tcg_board(PORT_IO["real"])
    result = guest.runner.run(predicate=lambda record: record.device == "serial0")
    assert result.stop_reason == "predicate matched"
    assert isinstance(result.last_exit, IoIn) and result.last_exit.port == 0x3FD


def test_rep_string_io_reports_each_element(tcg_board):
    guest = tcg_board("""
        mov si, text
        mov cx, 3
        mov dx, 0xe9
        rep outsb
        mov di, 0x700
        mov cx, 2
        mov dx, 0x3fd
        rep insb
        hlt
    text: db "abc"
    """)
    guest.runner.run()
    records = list(guest.machine.log.records)[:-1]
    outsb, insb = guest.address("rep outsb"), guest.address("rep insb")
    # RIP stays at an OUTS until its last element, as KVM reports a partial rep; an IN is
    # reported at the instruction, which completes with its answer
    assert [r.rip for r in records] == [outsb, outsb, outsb + 2, insb, insb]
    assert guest.machine.console.data == b"abc"
    assert guest.machine.memory.read(0x700, 2) == b"\x60\x60"


def test_stop_from_another_thread_loses_no_output_and_resumes(tcg_board):
    guest = tcg_board("""
        mov al, 'x'
    again:
        out 0xe9, al
        jmp again
    """)
    runner = guest.runner
    stopper = threading.Timer(0.05, runner.stop)
    stopper.start()
    result = runner.run(timeout=10)
    stopper.join()
    assert result.stop_reason == "stopped" and result.exits > 0
    written = len(guest.machine.console.data)
    assert written == guest.machine.log.histogram()["IO out"] == result.exits
    more = runner.run(max_exits=3)
    assert more.exits == 3 and len(guest.machine.console.data) == written + 3


def test_single_step_still_returns_each_port_access(tcg_board):
    guest = tcg_board(PORT_IO["real"])
    guest.runner.step()  # mov al, 'h'
    stepped = guest.runner.step()
    assert stepped.exit == IoOut(0xE9, 1, 1, b"h")
    assert stepped.rip_after == guest.address("mov dx, 0xe9")


REAL, PROTECTED, LONG = Segment(), Segment(db=1), Segment(l=1)


@pytest.mark.parametrize("code, cs, shape", [
    ("e6e9", REAL, IoShape(2)),                         # out 0xe9, al
    ("ee", REAL, IoShape(1)),                           # out dx, al
    ("66ef", REAL, IoShape(2)),                         # out dx, eax
    ("66e570", PROTECTED, IoShape(3)),                  # in ax, 0x70
    ("f36e", REAL, IoShape(2, 0xFFFF)),                 # rep outsb: CX
    ("67f36e", REAL, IoShape(3, 0xFFFFFFFF)),           # a32 rep outsb: ECX
    ("f36c", PROTECTED, IoShape(2, 0xFFFFFFFF)),        # rep insb: ECX
    ("67f36c", PROTECTED, IoShape(3, 0xFFFF)),          # a16 rep insb: CX
    ("f3486e", LONG, IoShape(3, (1 << 64) - 1)),        # rep outsb: RCX
    ("67f36e", LONG, IoShape(3, 0xFFFFFFFF)),           # a32 rep outsb: ECX
    ("486e", LONG, IoShape(2)),                         # outsb without rep
])
def test_io_shape(code, cs, shape):
    assert io_shape(bytes.fromhex(code) + b"\x90" * 4, cs) == shape


def test_rip_after_a_repeated_element():
    shape = IoShape(2, 0xFFFF)
    assert shape.rip_after(0x100, 2) == 0x100
    assert shape.rip_after(0x100, 1) == 0x102
    assert shape.rip_after(0x100, 0x10001) == 0x102  # only CX counts
    assert IoShape(2).rip_after(0x100, 5) == 0x102


def test_other_instructions_are_not_port_io():
    with pytest.raises(NotPortIo, match="90 90"):
        io_shape(b"\x90\x90", REAL)
    with pytest.raises(NotPortIo):
        io_shape(b"\x48\xee", REAL)  # DEC AX outside long mode, then OUT: not one instruction
