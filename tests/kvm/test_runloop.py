"""The run loop on real KVM: single steps, hardware breakpoints, stopping a runaway guest
from another thread and with Ctrl-C and then resuming it, timeouts, stop conditions, and
the fatal exits explained."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from boards import board  # noqa: F401 (fixture)
from vlab.kvm import Debug, ExitReason, Hlt, InternalError, IoIn, IoOut, MmioWrite, detect_backend
from vlab.kvm.vcpu import KICK_SIGNAL

BACKEND = detect_backend()

# `jmp $` at `spin` keeps the vCPU busy without a single exit; two NOPs written over it let
# the guest go on to print "A" and halt.
RUNAWAY = """
    mov al, 'A'
spin:
    jmp spin
    out 0xe9, al
    hlt
"""


def release(guest) -> None:
    guest.machine.memory.write(guest.address("jmp spin"), b"\x90\x90")


def assert_resumes_to_completion(guest) -> None:
    release(guest)
    result = guest.runner.run(timeout=10)
    assert isinstance(result.last_exit, Hlt), result
    assert guest.machine.console.data == b"A"


def test_step_through_a_real_mode_program(board):
    guest = board("""
        mov ax, 5
        add ax, 3
        out 0xe9, al
        in al, 0x80         ; nobody there: 0xff
        inc bx
        hlt
    """)
    steps = []
    while not guest.runner.halted and len(steps) < 10:
        steps.append(guest.runner.step())
    starts = [guest.address(marker) for marker in
              ("mov ax", "add ax", "out 0xe9", "in al", "inc bx", "hlt")]
    assert [s.rip_before for s in steps] == starts
    assert [s.rip_after for s in steps] == starts[1:] + [starts[-1] + 1]
    mov, add, out, in_, inc, hlt = steps
    assert set(mov.changed) == {"rip", "rax"} and mov.changed["rax"] == (0, 5)
    assert add.changed["rax"] == (5, 8) and {"rip", "rax"} <= set(add.changed) <= {"rip", "rax", "rflags"}
    assert isinstance(out.exit, IoOut) and set(out.changed) == {"rip"}
    assert guest.machine.console.data == b"\x08"
    assert isinstance(in_.exit, IoIn) and in_.changed["rax"] == (8, 0xFF)
    assert inc.changed["rbx"] == (0, 1) and isinstance(inc.exit, Debug)
    assert isinstance(hlt.exit, Hlt) and set(hlt.changed) == {"rip"}
    assert "rip" in str(mov) and "rax 0x0->0x5" in str(mov)


@pytest.mark.usefixtures("hardware_breakpoints")
def test_run_stops_at_each_breakpoint_then_completes(board):
    guest = board("""
        mov cx, 1
    first:
        mov ax, 2
        out 0xe9, al
    second:
        mov bx, 3
        hlt
    """)
    first, second = guest.address("first"), guest.address("second")
    guest.runner.set_breakpoints([first, second])
    hit = guest.runner.run(timeout=10)
    assert hit.stop_reason == f"breakpoint 0 at {first:#x}" and hit.rip == first
    assert guest.vcpu.get_regs().rax == 0
    hit = guest.runner.run(timeout=10)
    assert hit.stop_reason == f"breakpoint 1 at {second:#x}" and hit.rip == second
    assert guest.machine.console.data == b"\x02"
    done = guest.runner.run(timeout=10)
    assert isinstance(done.last_exit, Hlt), done
    assert guest.vcpu.get_regs().rbx == 3


def _stop_later(runner, delay: float, stopped_at: list[float]) -> threading.Thread:
    def stop():
        time.sleep(delay)
        stopped_at.append(time.perf_counter())
        runner.stop("stop button")
    thread = threading.Thread(target=stop)
    thread.start()
    return thread


def test_stop_a_runaway_guest_from_another_thread_then_resume(board):
    guest = board(RUNAWAY)
    stopped_at: list[float] = []
    helper = _stop_later(guest.runner, 0.2, stopped_at)
    result = guest.runner.run(timeout=10)
    latency = time.perf_counter() - stopped_at[0]
    helper.join()
    print(f"\nstop() from another thread: run() returned {latency * 1e3:.2f} ms later")
    assert result.stop_reason == "stop button"  # not the 10 s timeout
    assert result.rip == guest.address("jmp spin") and result.exits == 0
    assert_resumes_to_completion(guest)


def test_stop_a_guest_running_in_a_worker_thread(board):
    """The vCPU in its own thread, as QEMU runs it; the stop comes from the main thread."""
    guest = board(RUNAWAY)
    results = []
    worker = threading.Thread(target=lambda: results.append(guest.runner.run(timeout=10)))
    worker.start()
    time.sleep(0.2)
    start = time.perf_counter()
    guest.runner.stop("stop button")
    worker.join(5)
    latency = time.perf_counter() - start
    print(f"\nstop() of a vCPU thread: it returned {latency * 1e3:.2f} ms later")
    assert not worker.is_alive() and results[0].stop_reason == "stop button"
    assert_resumes_to_completion(guest)


def test_timeout_of_a_guest_running_in_a_worker_thread(board):
    """Neither the vCPU thread nor the timer thread can install the kick signal's handler
    (only the main thread can): it must be in place from when the vCPU was created, in a
    fresh process too."""
    previous = signal.signal(KICK_SIGNAL, signal.SIG_DFL)
    try:
        guest = board(RUNAWAY)
        results = []
        worker = threading.Thread(target=lambda: results.append(guest.runner.run(timeout=0.3)),
                                  daemon=True)
        worker.start()
        worker.join(3)
        assert not worker.is_alive(), "the timeout did not stop the vCPU thread"
        assert results[0].stop_reason == "timeout after 0.3 s"
    finally:
        signal.signal(KICK_SIGNAL, previous)
    assert_resumes_to_completion(guest)


def test_ctrl_c_stops_the_guest_without_keyboard_interrupt(board):
    guest = board(RUNAWAY)
    main = threading.main_thread().ident
    sent_at: list[float] = []

    def press_ctrl_c():
        time.sleep(0.2)
        sent_at.append(time.perf_counter())
        signal.pthread_kill(main, signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a process started in background
    helper = threading.Thread(target=press_ctrl_c)
    helper.start()
    result = guest.runner.run(timeout=10)  # a KeyboardInterrupt here would fail the test
    latency = time.perf_counter() - sent_at[0]
    helper.join()
    print(f"\nCtrl-C: run() returned {latency * 1e3:.2f} ms after SIGINT")
    assert result.stop_reason == "interrupted by Ctrl-C"
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert result.rip == guest.address("jmp spin")
    assert_resumes_to_completion(guest)


def test_timeout_stops_a_runaway_guest(board):
    """The timeout, not anything else, ended the run: the guest was still spinning, with no
    exit of its own, and the run lasted at least the timeout (how much longer depends on
    the host: timings belong in benchmarks/)."""
    guest = board(RUNAWAY)
    result = guest.runner.run(timeout=0.3)
    assert result.stop_reason == "timeout after 0.3 s"
    assert result.rip == guest.address("jmp spin") and result.exits == 0
    assert result.seconds >= 0.3
    assert_resumes_to_completion(guest)


def test_max_exits_then_resume(board):
    guest = board("""
        mov al, 'a'
    again:
        out 0xe9, al
        inc al
        cmp al, 'f'
        jne again
        hlt
    """)
    result = guest.runner.run(max_exits=3)
    assert result.stop_reason == "max_exits=3 reached" and result.exits == 3
    assert guest.machine.console.data == b"abc"
    result = guest.runner.run()
    assert isinstance(result.last_exit, Hlt) and result.exits == 3
    assert guest.machine.console.data == b"abcde"


def test_until_hlt(board):
    guest = board("""
        out 0xe9, al
        out 0xe9, al
        hlt
    """)
    result = guest.runner.run(until=ExitReason.HLT)
    assert isinstance(result.last_exit, Hlt) and result.exits == 3


def test_until_an_exit_class(board):
    guest = board("""
        mov esi, 0xd0000000
        out 0xe9, al
        mov dword [esi + 4], 5
        out 0xe9, al
        hlt
    """, mode="protected")
    result = guest.runner.run(until=MmioWrite)
    assert isinstance(result.last_exit, MmioWrite) and result.exits == 2
    assert result.stop_reason == "reached MMIO write 0xd0000004 len 4 data 05 00 00 00"


def test_triple_fault_is_a_shutdown_explained(board):
    guest = board("""
        mov eax, 1
        ud2                 ; #UD with no IDT: #GP, #DF, then shutdown
    """, mode="protected")
    result = guest.runner.run(timeout=10)
    assert result.stop_reason.startswith("SHUTDOWN"), result
    assert "triple fault" in result.explanation
    if BACKEND.triple_fault_state == "kept":
        assert "no IDT (IDTR limit 0)" in result.explanation
    else:  # SVM resets the vCPU: the explanation says the registers cannot tell
        assert result.rip == 0xFFF0 and "read as at reset (RIP 0xfff0)" in result.explanation


@pytest.mark.skipif(not BACKEND.emulates_kernel_mode,
                    reason=f"{BACKEND.module} runs guest code on the CPU: no emulator to fail")
def test_emulation_failure_is_explained_with_the_instruction(board):
    guest = board("""
        cmpxchg16b [0x500]  ; not in KVM's instruction emulator
        hlt
    """, mode="long")
    result = guest.runner.run(timeout=10)
    assert isinstance(result.last_exit, InternalError), result
    assert result.stop_reason.startswith("INTERNAL_ERROR EMULATION")
    text = result.explanation
    assert "64-bit code" in text and "cmpxchg16b xmmword ptr [0x500]" in text
    assert "data: 0x1 " in text
