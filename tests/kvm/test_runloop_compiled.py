"""The compiled run loop (vlab/machine/_runloop.c) against the Python loop it stands in for
(`VcpuRunner._run_python`): each guest runs once through each, on fresh boards, and the two
must leave the same records, the same device effects and the same stop reasons. KVM's own
counters differ from run to run (host interrupts, timing), so their values are compared by
what must hold in both: each record's counters continue the vCPU's previous ones, and the
deltas add up to what the stats fd says the run did."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from boards import DEBUGCON, SERIAL, _boards
from vlab.kvm import Debug, ExitReason, Hlt, Interrupted, IoIn, IoOut, detect_backend
from vlab.machine import runloop

BACKEND = detect_backend()
LOOPS = ("python", "compiled")

pytestmark = pytest.mark.skipif(runloop._runloop is None, reason=(
    "vlab.machine._runloop is not built here: no compiled loop to compare (setup.py builds "
    "it where gcc and Python's headers exist)"))


def run_guest(kvm, monkeypatch, loop: str, source: str, mode: str = "real",
              prepare=None, **options):
    """Run `source` to its end through `loop` on a fresh board; what it left behind."""
    with monkeypatch.context() as patch:
        if loop == "python":
            patch.setattr(runloop, "_runloop", None)
        boards = _boards("kvm")
        make = next(boards)
        try:
            guest = make(source, mode=mode)
            runner = guest.runner
            assert runner.loop == loop
            start = runner.kernel_counters()
            heard, handed = [], []
            runner.log.subscribe(lambda record: heard.append(record.seq))
            if prepare is not None:
                prepare(guest)
            if loop == "compiled":   # count the exits the compiled loop leaves to Python
                leave = runner._exit_from_compiled
                runner._exit_from_compiled = lambda *args: (handed.append(args), leave(*args))[1]
            result = runner.run(**options)
            return observe(guest, result, start, heard), len(handed)
        finally:
            next(boards, None)


def observe(guest, result, start: dict, heard: list) -> dict:
    """Everything the two loops must agree on, and the counters' bookkeeping checked."""
    machine, runner, log = guest.machine, guest.runner, guest.runner.log
    records = list(log)
    previous = None
    for record in records:
        assert record.counters_before is not None and record.counters_after is not None
        if previous is not None:
            assert record.counters_before == previous.counters_after, "a gap in the counters"
        previous = record
    moved = {name: value - start[name] for name, value in runner.kernel_counters().items()
             if name in log.counter_names}
    totals = log.kernel_totals()
    assert totals == {name: moved[name] for name in totals}, "deltas are exact"
    regs = runner.vcpu.get_regs()
    return {
        "stop_reason": result.stop_reason, "exits": result.exits,
        "last_exit": result.last_exit, "rip": result.rip, "rax": regs.rax, "rbx": regs.rbx,
        "halted": runner.halted,
        "records": [(r.seq, r.vcpu, r.exit, r.rip, r.device, r.claimed) for r in records],
        "histogram": log.histogram(), "heard": heard == [r.seq for r in records],
        "console": machine.console.data, "debugcon": machine.devices["debugcon"].text,
        "serial": machine.devices["serial0"].state(),
        "exit_request": machine.exit_request,
        "dataframe": log.to_dataframe().drop(columns=["kvm_run_us", *(
            f"kvm.{name}" for name in log.counter_names)]).to_dict("list"),
    }


def assert_same(kvm, monkeypatch, source: str, handed: int | None = None, **kwargs) -> dict:
    """Both loops leave the same; the compiled one left `handed` exits to Python (the first,
    which starts the vCPU's counters in the log, and those of devices it does not handle)."""
    (python, _), (compiled, to_python) = (run_guest(kvm, monkeypatch, loop, source, **kwargs)
                                          for loop in LOOPS)
    assert compiled == python
    if handed is not None:
        assert to_python == handed
    return python


def test_debug_console_loop(kvm, monkeypatch):
    seen = assert_same(kvm, monkeypatch, DEBUGCON, handed=2)   # the first exit, HLT
    assert seen["console"] == bytes(range(ord("a"), ord("a") + 40))
    assert seen["histogram"] == {"IO out": 40, "HLT": 1}
    assert isinstance(seen["last_exit"], Hlt) and seen["halted"]


def test_uart_polling(kvm, monkeypatch):
    seen = assert_same(kvm, monkeypatch, SERIAL, handed=2)   # the first exit, HLT
    assert seen["console"] == b"Hi, serial!\r\n"
    assert seen["histogram"] == {"IO in": 13, "IO out": 13, "HLT": 1}


def test_uart_with_an_interrupt_enabled_is_left_to_python(kvm, monkeypatch):
    """IER's THR-empty interrupt on: each byte sent raises the line again, which only the
    Python model does; the records and the UART's registers still agree."""
    seen = assert_same(kvm, monkeypatch, """
        mov dx, 0x3f9               ; IER
        mov al, 0x02                ; THRI
        out dx, al
        mov dx, 0x3fd
        in al, dx                   ; LSR
        mov dx, 0x3f8
        mov al, 'k'
        out dx, al                  ; THR
        hlt
    """, handed=4)   # the first exit and the UART's two, HLT
    assert seen["console"] == b"k" and seen["serial"]["iir"] & 0x0F == 0x02


def test_unclaimed_ports_and_isa_debug_exit(kvm, monkeypatch):
    seen = assert_same(kvm, monkeypatch, """
        out 0x80, al            ; nobody: dropped
        in al, 0x81             ; nobody: all-ones
        mov bl, al
        in ax, 0x82
        mov al, 0x21
        out 0xf4, al            ; isa-debug-exit: status (0x21 << 1) | 1
        hlt
    """, handed=2)   # the first exit, isa-debug-exit
    assert seen["rbx"] & 0xFF == 0xFF and seen["rax"] & 0xFFFF == 0xFF21
    assert seen["exit_request"].status == 0x43
    assert seen["stop_reason"] == "isa-debug-exit: the guest asked to exit with status 67"
    assert [r[4:] for r in seen["records"]] == [
        (None, False), ("unassigned: reads all-ones (QEMU's unassigned_io_ops)", False),
        ("unassigned: reads all-ones (QEMU's unassigned_io_ops)", False), ("debug-exit", True)]


def test_mmio_string_io_and_other_devices(kvm, monkeypatch):
    """MMIO, `rep outsb` (one exit of count 3 on VMX and SVM, three on kvm_pvm, whose
    emulator runs it) and fw_cfg: the Python side of the compiled loop."""
    seen = assert_same(kvm, monkeypatch, """
        mov esi, 0xd0000000
        mov eax, [esi]              ; testdev ID
        mov dword [esi + 4], 42     ; SCRATCH
        mov ebx, [esi + 4]
        mov esi, text
        mov ecx, 3
        mov dx, 0xe9
        rep outsb
        mov dx, 0x510
        mov ax, 0
        out dx, ax                  ; fw_cfg: select the signature
        inc dx
        in al, dx
        hlt
    text: db "xyz"
    """, mode="protected")
    assert seen["rbx"] == 42 and seen["console"] == b"xyz" and seen["rax"] & 0xFF == ord("Q")


@pytest.mark.parametrize("options, reason", [
    ({"max_exits": 5}, "max_exits=5 reached"),
    ({"until": IoIn}, "reached IO in port 0x81 size 1"),
    ({"until": ExitReason.IO}, "reached IO out port 0xe9 size 1 data 61"),
    ({"until": ExitReason.HLT}, "HLT: the guest halted"),
    ({"predicate": lambda record: record.rip >= 0x8000 + 8}, "predicate matched"),
])
def test_stop_conditions(kvm, monkeypatch, options, reason):
    seen = assert_same(kvm, monkeypatch, """
        mov al, 'a'
        out 0xe9, al
        out 0xe9, al
        out 0x80, al
        in al, 0x81
        out 0xe9, al
        out 0xe9, al
        hlt
    """, **options)
    assert seen["stop_reason"] == reason


def test_timeout_of_a_runaway_guest(kvm, monkeypatch):
    seen = assert_same(kvm, monkeypatch, "jmp $", timeout=0.2)
    assert seen["stop_reason"] == "timeout after 0.2 s" and seen["exits"] == 0
    assert all(isinstance(r[2], Interrupted) for r in seen["records"])


def test_stop_from_another_thread(kvm, monkeypatch):
    """A guest printing for ever, stopped once it has printed: the stop is heard in both
    loops and nothing the guest wrote is lost (the compiled loop's batched console)."""
    def stop_later(guest):
        def stop():
            while len(guest.machine.console.data) < 100:
                time.sleep(0.001)
            guest.runner.stop()
        threading.Thread(target=stop, daemon=True).start()

    for loop in LOOPS:
        seen, _ = run_guest(kvm, monkeypatch, loop, """
            again:
                out 0xe9, al
                jmp again
            """, prepare=stop_later)
        assert seen["stop_reason"] == "stopped"
        assert seen["console"] == seen["debugcon"].encode()
        assert len(seen["console"]) == seen["histogram"]["IO out"] >= 100
        assert seen["heard"]


def test_stop_of_a_guest_that_spins_after_printing(kvm, monkeypatch):
    """The kick's EINTR is recorded (INTR) and the stop heard; the console's listener (a
    terminal streaming it) gets each byte as it is written."""
    streamed = []

    def stop_once_printed(guest):
        streamed.append(bytearray())
        guest.machine.console.listeners.append(streamed[-1].extend)

        def stop():
            while not guest.machine.console.data.endswith(b"\n"):
                time.sleep(0.001)
            guest.runner.stop()
        threading.Thread(target=stop, daemon=True).start()

    seen = assert_same(kvm, monkeypatch, """
        mov al, 'o'
        out 0xe9, al
        mov dx, 0x3f8
        mov al, 10
        out dx, al
        jmp $
    """, prepare=stop_once_printed, handed=1)   # the first exit
    assert seen["stop_reason"] == "stopped" and seen["console"] == b"o\n"
    assert [type(r[2]) for r in seen["records"]] == [IoOut, IoOut, Interrupted]
    assert streamed == [b"o\n", b"o\n"]   # each loop's


@pytest.mark.usefixtures("hardware_breakpoints")
def test_breakpoints(kvm, monkeypatch):
    def breakpoint_at_second(guest):
        guest.runner.set_breakpoints([guest.address("second")])

    seen = assert_same(kvm, monkeypatch, """
        out 0xe9, al
    second:
        out 0xe9, al
        hlt
    """, prepare=breakpoint_at_second)
    assert seen["stop_reason"].startswith("breakpoint 0 at ")
    assert isinstance(seen["last_exit"], Debug)


def test_listeners_and_readers_see_every_record(kvm, monkeypatch):
    for loop in LOOPS:
        seen, _ = run_guest(kvm, monkeypatch, loop, DEBUGCON)
        assert seen["heard"], f"{loop}: a listener missed a record"


UNCLAIMED_FOR_EVER = """
    again:
        out 0x80, al
        jmp again
"""


def test_a_reader_thread_sees_whole_rows_during_a_run(kvm, monkeypatch):
    """Exits to a port nobody claims run on without the GIL in the compiled loop; a thread
    reading the log meanwhile sees every record it reaches complete, and gets to run."""
    seen, torn = [], []

    def read_while_running(guest):
        log = guest.runner.log

        def read():
            while len(seen) < 200:
                total = log.total
                if total > 1:
                    record = log.record(total)
                    if record.seq != total or not isinstance(record.exit, IoOut) \
                            or record.exit.port != 0x80:
                        torn.append(record)
                    seen.append(total)
            guest.runner.stop()
        threading.Thread(target=read, daemon=True).start()

    for loop in LOOPS:
        seen.clear()
        result, _ = run_guest(kvm, monkeypatch, loop, UNCLAIMED_FOR_EVER,
                              prepare=read_while_running, timeout=30)
        assert result["stop_reason"] == "stopped", f"{loop}: {result['stop_reason']}"
        assert torn == [] and len(seen) == 200
        assert seen == sorted(seen)


def test_ctrl_c_during_a_run_of_unclaimed_exits(kvm, monkeypatch):
    """SIGINT reaches run() whether it lands inside KVM_RUN (EINTR) or between two, where
    the compiled loop may hold no GIL: it checks signals at least every millisecond."""
    main = threading.main_thread().ident

    def press_ctrl_c(guest):
        def press():
            while guest.runner.log.total < 1000:
                time.sleep(0.001)
            signal.pthread_kill(main, signal.SIGINT)
        threading.Thread(target=press, daemon=True).start()

    for loop in LOOPS:
        seen, _ = run_guest(kvm, monkeypatch, loop, UNCLAIMED_FOR_EVER, prepare=press_ctrl_c,
                            timeout=30)
        assert seen["stop_reason"] == "interrupted by Ctrl-C", f"{loop}: {seen['stop_reason']}"
        assert seen["histogram"]["IO out"] >= 1000
