"""Port 0xE9 (isa-debugcon) and isa-debug-exit, alone and behind the port bus."""
from __future__ import annotations

import pytest

from vlab.devices import Bus, DebugConsole, IsaDebugExit


def test_debugcon_emits_each_byte_and_keeps_the_text():
    out: list[bytes] = []
    con = DebugConsole(output=out.append)
    for ch in "ok\n".encode():
        con.write(0, ch)
    assert out == [b"o", b"k", b"\n"]
    assert con.text == "ok\n"
    assert con.state() == {"readback": 0xE9, "bytes_written": 3}


def test_debugcon_without_a_sink_still_records():
    con = DebugConsole()
    con.write(0, ord("x"))
    assert con.text == "x"


def test_debugcon_reads_back_0xe9_so_guests_can_probe_it():
    assert DebugConsole().read(0) == 0xE9
    assert DebugConsole(readback=0x42).read(0) == 0x42


def test_debugcon_keeps_the_low_byte_of_a_wide_write():
    con = DebugConsole()
    con.write(0, 0x4241, size=2)
    assert con.text == "A"


def test_debugcon_decodes_utf8_split_across_writes():
    con = DebugConsole()
    for byte in "é→".encode():
        con.write(0, byte)
    assert con.text == "é→"


def test_rep_outsb_to_port_0xe9():
    io = Bus("pio")
    con = DebugConsole()
    io.register(DebugConsole.IOBASE, DebugConsole.SIZE, con)
    assert io.pio_out(0xE9, 1, 6, b"Hello\n") is con
    assert con.text == "Hello\n"
    assert io.read(0xE9, 1) == 0xE9


def test_debug_exit_is_silent_until_written():
    dev = IsaDebugExit()
    assert dev.exit_status is None
    assert dev.read(0) == 0
    assert dev.state() == {"exit_status": None}


@pytest.mark.parametrize("value, size, status", [
    (0, 1, 1), (0x10, 1, 0x21), (0x31, 1, 0x63), (0x1234, 2, 0x2469),
    (0xFFFFFFFF, 4, 0x1FFFFFFFF), (0x301, 1, 0x03),  # the value is cut to the access size
])
def test_debug_exit_status_is_value_shifted_left_plus_one(value, size, status):
    seen: list[int] = []
    dev = IsaDebugExit(on_exit=seen.append)
    dev.write(0, value, size)
    assert dev.exit_status == status
    assert seen == [status]


def test_debug_exit_behind_the_bus_at_0xf4():
    io = Bus("pio")
    dev = IsaDebugExit()
    io.register(IsaDebugExit.IOBASE, IsaDebugExit.SIZE, dev)
    assert io.mappings() == [(0xF4, 0xF8, "debug-exit")]
    io.write(0xF4, 0x10, 4)
    assert dev.exit_status == 0x21
