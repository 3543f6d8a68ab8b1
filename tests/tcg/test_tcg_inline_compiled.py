"""Port I/O inside tcg's emulation handled in C (_runloop.c's InlinePortIo, called by the C
hooks of _insnhooks.c) against the Python handling it stands in for (`VcpuRunner._on_port_io`),
reached from the C hooks without the compiled loop, or from the ctypes trampolines of a vlab
built without a compiler: each guest runs once each way, on fresh boards, and all must leave
the same records (tcg's counters are exact, so they are compared too), device effects and
stop reasons."""
from __future__ import annotations

import threading
import time

import pytest

from boards import DEBUGCON, SERIAL, _boards
from vlab.accel.tcg import engine
from vlab.kvm import Debug, ExitReason, Hlt, Interrupted, IoIn, IoOut
from vlab.machine import runloop

PATHS = ("python", "ctypes", "compiled")

pytestmark = pytest.mark.skipif(runloop._runloop is None or engine._insnhooks is None, reason=(
    "vlab.machine._runloop or vlab.accel.tcg._insnhooks is not built here: no compiled port "
    "I/O to compare (setup.py builds them where gcc and Python's headers exist)"))


def run_guest(monkeypatch, path: str, source: str, mode: str = "real", prepare=None,
              **options):
    """Run `source` on a fresh tcg board with port I/O handled by `path`; what it left behind,
    and how many accesses reached `_on_port_io` (Python)."""
    with monkeypatch.context() as patch:
        if path == "python":
            patch.setattr(runloop, "_runloop", None)
        if path == "ctypes":
            patch.setattr(engine, "_C_HOOKS", {})
        boards = _boards("tcg")
        make = next(boards)
        try:
            guest = make(source, mode=mode)
            runner = guest.runner
            heard, handed = [], []
            runner.log.subscribe(lambda record: heard.append(record.seq))
            if prepare is not None:
                prepare(guest)
            on_port_io = runner._on_port_io
            runner._on_port_io = lambda exit: (handed.append(exit), on_port_io(exit))[1]
            result = runner.run(**options)
            return observe(guest, result, heard), len(handed)
        finally:
            next(boards, None)


def observe(guest, result, heard: list) -> dict:
    machine, runner, log = guest.machine, guest.runner, guest.runner.log
    records = list(log)
    regs = runner.vcpu.get_regs()
    return {
        "stop_reason": result.stop_reason, "exits": result.exits, "last_exit": result.last_exit,
        "rip": result.rip, "rax": regs.rax, "rbx": regs.rbx, "halted": runner.halted,
        "records": [(r.seq, r.vcpu, r.exit, r.rip, r.device, r.claimed, r.counters_before,
                     r.counters_after) for r in records],
        "counters": runner.kernel_counters(), "previous": runner._previous_counters,
        "histogram": log.histogram(), "heard": heard == [r.seq for r in records],
        "console": machine.console.data, "debugcon": machine.devices["debugcon"].text,
        "serial": machine.devices["serial0"].state(), "exit_request": machine.exit_request,
    }


def assert_same(monkeypatch, source: str, handed: int | None = None, **kwargs) -> dict:
    """Every path leaves the same; the compiled one left `handed` accesses to Python."""
    (python, on_python), (ctypes, on_ctypes), (compiled, to_python) = (
        run_guest(monkeypatch, path, source, **kwargs) for path in PATHS)
    assert ctypes == python and on_ctypes == on_python
    assert compiled == python
    if handed is not None:
        assert to_python == handed
    assert to_python <= on_python
    return python


def test_debug_console(monkeypatch):
    # Python: the first access (the vCPU's first record in the log, and an OUT whose RIP
    # past it is not known until the vCPU has decoded it)
    seen = assert_same(monkeypatch, DEBUGCON, handed=1)
    assert seen["console"] == bytes(range(ord("a"), ord("a") + 40))
    assert seen["histogram"] == {"IO out": 40, "HLT": 1}
    assert isinstance(seen["last_exit"], Hlt) and seen["halted"]
    assert seen["counters"]["io_exits"] == 40 and seen["previous"] == seen["records"][-1][-1]


def test_uart_polling(monkeypatch):
    seen = assert_same(monkeypatch, SERIAL, handed=2)   # the first IN, the first OUT
    assert seen["console"] == b"Hi, serial!\r\n"
    assert seen["histogram"] == {"IO in": 13, "IO out": 13, "HLT": 1}


def test_uart_with_an_interrupt_enabled_is_left_to_python(monkeypatch):
    seen = assert_same(monkeypatch, """
        mov dx, 0x3f9               ; IER
        mov al, 0x02                ; THRI
        out dx, al
        mov dx, 0x3fd
        in al, dx                   ; LSR
        mov dx, 0x3f8
        mov al, 'k'
        out dx, al                  ; THR
        hlt
    """, handed=3)
    assert seen["console"] == b"k" and seen["serial"]["iir"] & 0x0F == 0x02


def test_unclaimed_ports_and_isa_debug_exit(monkeypatch):
    seen = assert_same(monkeypatch, """
        mov cx, 3
    again:
        out 0x80, al            ; nobody: dropped
        in al, 0x81             ; nobody: all-ones
        mov bl, al
        in ax, 0x82
        loop again
        mov al, 0x21
        out 0xf4, al            ; isa-debug-exit: status (0x21 << 1) | 1
        hlt
    """, handed=2)   # the first access, isa-debug-exit
    assert seen["rbx"] & 0xFF == 0xFF and seen["rax"] & 0xFFFF == 0xFF21
    assert seen["exit_request"].status == 0x43
    assert seen["stop_reason"] == "isa-debug-exit: the guest asked to exit with status 67"
    assert [r[4:6] for r in seen["records"][:3]] == [
        (None, False), ("unassigned: reads all-ones (QEMU's unassigned_io_ops)", False),
        ("unassigned: reads all-ones (QEMU's unassigned_io_ops)", False)]


def test_mmio_string_io_and_other_devices(monkeypatch):
    """MMIO, `rep outsb` (an exit per element, its RIP by the count register: Python's) and
    fw_cfg between accesses handled in C."""
    seen = assert_same(monkeypatch, """
        out 0xe9, al
        mov esi, 0xd0000000
        mov eax, [esi]              ; testdev ID
        mov dword [esi + 4], 42     ; SCRATCH
        mov ebx, [esi + 4]
        out 0xe9, al
        mov esi, text
        mov ecx, 3
        mov dx, 0xe9
        rep outsb
        mov dx, 0x510
        mov ax, 0
        out dx, ax                  ; fw_cfg: select the signature
        inc dx
        in al, dx
        in al, 0x81
        hlt
    text: db "xyz"
    """, mode="protected")
    assert seen["rbx"] == 42 and seen["console"].endswith(b"xyz") and seen["rax"] & 0xFF == 0xFF


@pytest.mark.parametrize("options, reason", [
    ({"max_exits": 5}, "max_exits=5 reached"),
    ({"until": IoIn}, "reached IO in port 0x81 size 1"),
    ({"until": ExitReason.IO}, "reached IO out port 0xe9 size 1 data 61"),
    ({"until": ExitReason.HLT}, "HLT: the guest halted"),
    ({"predicate": lambda record: record.rip >= 0x8000 + 8}, "predicate matched"),
])
def test_stop_conditions(monkeypatch, options, reason):
    seen = assert_same(monkeypatch, """
        mov al, 'a'
        mov cx, 2
    again:
        out 0xe9, al
        out 0x80, al
        loop again
        in al, 0x81
        out 0xe9, al
        out 0xe9, al
        hlt
    """, **options)
    assert seen["stop_reason"] == reason


def test_stop_from_another_thread(monkeypatch):
    """A guest printing for ever, stopped once it has printed: nothing it wrote is lost."""
    def stop_later(guest):
        def stop():
            while len(guest.machine.console.data) < 1000:
                time.sleep(0.001)
            guest.runner.stop()
        threading.Thread(target=stop, daemon=True).start()

    for path in PATHS:
        seen, _ = run_guest(monkeypatch, path, """
            again:
                out 0xe9, al
                jmp again
            """, prepare=stop_later)
        assert seen["stop_reason"] == "stopped"
        assert seen["console"] == seen["debugcon"].encode()
        assert len(seen["console"]) == seen["histogram"]["IO out"] >= 1000
        assert seen["heard"]
        assert all(r[6] is not None and r[6] != r[7] for r in seen["records"]
                   if not isinstance(r[2], Interrupted))


def test_console_listener_fed_byte_by_byte(monkeypatch):
    streamed = []

    def listen(guest):
        streamed.append(bytearray())
        guest.machine.console.listeners.append(streamed[-1].extend)

    seen = assert_same(monkeypatch, """
        mov cx, 2
    again:
        mov al, 'o'
        out 0xe9, al
        out 0xe9, al
        mov dx, 0x3f8
        mov al, 10
        out dx, al
        out dx, al
        loop again
        hlt
    """, prepare=listen, handed=4)   # each OUT's first time: then its RIP past it is known
    assert seen["console"] == b"oo\n\n" * 2 and streamed == [b"oo\n\n" * 2] * len(PATHS)
    assert [type(r[2]) for r in seen["records"]] == [IoOut] * 8 + [Hlt]


def test_breakpoints(monkeypatch):
    """A run that begins at a breakpoint steps over it (single-step: Python's) and stops
    at the next."""
    def breakpoints(guest):
        guest.runner.set_breakpoints([guest.address("first"), guest.address("second")])
        guest.runner.run()   # to the first

    seen = assert_same(monkeypatch, """
        out 0xe9, al
        out 0xe9, al
    first:
        out 0xe9, al
        out 0xe9, al
    second:
        out 0xe9, al
        hlt
    """, prepare=breakpoints)
    assert seen["stop_reason"].startswith("breakpoint 1 at ")
    assert isinstance(seen["last_exit"], Debug) and seen["console"].count(b"\0") == 4


def test_listeners_see_every_record(monkeypatch):
    for path in PATHS:
        seen, _ = run_guest(monkeypatch, path, SERIAL)
        assert seen["heard"], f"{path}: a listener missed a record"
