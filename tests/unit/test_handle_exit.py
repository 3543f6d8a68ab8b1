"""The run loop without KVM: `handle_exit` fed made-up exits, and `VcpuRunner` driving a
scripted fake vCPU through every way a run can end."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from vlab.accel.base import Capabilities
from vlab.devices import BusError
from vlab.kvm import ExitReason
from vlab.kvm.backend import KVM_PVM, SVM, TCG, VMX
from vlab.kvm.abi import InternalErrorSuberror, SystemEventType
from vlab.kvm.exits import (Debug, ExitDecodeError, FailEntry, Hlt, InternalError, Interrupted,
                            IoIn, IoOut, MmioRead, MmioWrite, OtherExit, Shutdown, SystemEvent,
                            X86Rdmsr, X86Wrmsr)
from vlab.kvm.state import DebugRegs, Regs, Sregs
from vlab.machine.board import TESTDEV_BASE, Machine
from vlab.machine.cpu_modes import setup_mode
from vlab.machine.dispatch import RESUME, STOP, handle_exit
from vlab.machine.runloop import VcpuRunner

MAGIC = (0x564C4142).to_bytes(4, "little")  # the MMIO test device's ID register


# --- a board whose buses and devices are real, on a VM that is not ----------------------------

class FakeVm:
    def map_memory(self, region) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def machine():
    board = Machine(SimpleNamespace(name="fake", backend=None, capabilities=Capabilities(
        kernel=False, dirty_log=False, irqchip=False, inline_port_io=False)), FakeVm(), ram_size="1M")
    board.init_memory()
    board.add_standard_devices()
    yield board
    board.close()


def handle(machine, exit):
    return handle_exit(exit, machine.pio, machine.mmio)


# --- handle_exit --------------------------------------------------------------------------------

def test_out_to_the_debug_console_is_printed(machine):
    outcome = handle(machine, IoOut(0xE9, 1, 1, b"A"))
    assert (outcome.action, outcome.device, outcome.claimed, outcome.reply) == \
        (RESUME, "debugcon", True, None)
    assert machine.console.data == b"A"


def test_string_out_writes_every_element(machine):
    """`rep outsb` with count 3 is three writes in one exit."""
    outcome = handle(machine, IoOut(0xE9, 1, 3, b"abc"))
    assert outcome.device == "debugcon"
    assert machine.console.data == b"abc"


def test_out_to_a_serial_thr_prints(machine):
    handle(machine, IoOut(0x3F8, 1, 1, b"Z"))
    assert machine.console.data == b"Z"


def test_unclaimed_out_is_dropped_and_marked(machine):
    outcome = handle(machine, IoOut(0x80, 1, 1, b"\x12"))
    assert (outcome.action, outcome.device, outcome.claimed) == (RESUME, None, False)
    assert machine.console.data == b""


def test_in_from_the_serial_lsr_answers_transmitter_empty(machine):
    outcome = handle(machine, IoIn(0x3FD, 1, 1, 0x1000))
    assert outcome.device == "serial0" and outcome.claimed
    assert outcome.reply[0] & 0x60 == 0x60  # THRE | TEMT


def test_string_in_reads_count_elements(machine):
    outcome = handle(machine, IoIn(0xE9, 1, 4, 0x1000))  # the debug console reads back 0xE9
    assert outcome.reply == b"\xe9" * 4


def test_unclaimed_in_reads_all_ones(machine):
    outcome = handle(machine, IoIn(0x80, 2, 3, 0x1000))
    assert (outcome.reply, outcome.claimed) == (b"\xff" * 6, False)
    assert outcome.device == "unassigned: reads all-ones (QEMU's unassigned_io_ops)"


def test_mmio_read_of_the_test_device(machine):
    outcome = handle(machine, MmioRead(TESTDEV_BASE, 4))
    assert (outcome.reply, outcome.device, outcome.claimed) == (MAGIC, "testdev", True)


def test_mmio_write_then_read_back(machine):
    outcome = handle(machine, MmioWrite(TESTDEV_BASE + 4, 4, (0x1234).to_bytes(4, "little")))
    assert (outcome.action, outcome.device) == (RESUME, "testdev")
    assert handle(machine, MmioRead(TESTDEV_BASE + 4, 4)).reply == (0x1234).to_bytes(4, "little")


def test_unclaimed_mmio_reads_zero_and_drops_writes(machine):
    """QEMU 7.2 answers a read of unassigned memory with 0 (unassigned_mem_ops), and the
    exit's device column says so."""
    read = handle(machine, MmioRead(0xE000_0000, 8))
    assert (read.reply, read.claimed) == (bytes(8), False)
    assert read.device == "unassigned: reads 0 (QEMU's unassigned_mem_ops)"
    write = handle(machine, MmioWrite(0xE000_0000, 4, b"\1\2\3\4"))
    assert (write.action, write.claimed) == (RESUME, False)


def test_odd_length_mmio_read_is_widened_then_cut(machine):
    """A 3-byte load reaches the device as a 4-byte read (the test device only answers
    those) and the guest gets the first 3 bytes."""
    assert handle(machine, MmioRead(TESTDEV_BASE, 3)).reply == MAGIC[:3]


@pytest.mark.parametrize("exit, words", [
    (Hlt(), "HLT"),
    (Shutdown(), "SHUTDOWN"),
    (FailEntry(0x80000021, 1), "0x80000021"),
    (InternalError(InternalErrorSuberror.EMULATION, (1, 2)), "EMULATION"),
    (Debug(1, 0x1000, 0xFFFF4FF0, 0), "debug"),
    (SystemEvent(SystemEventType.RESET), "RESET"),
    (OtherExit(ExitReason.HYPERCALL), "unhandled exit HYPERCALL"),
])
def test_exits_that_stop_the_guest(machine, exit, words):
    outcome = handle(machine, exit)
    assert outcome.action == STOP
    assert words in outcome.stop_reason


def test_rdmsr_is_answered_unclaimed_and_wrmsr_dropped(machine):
    rdmsr = handle(machine, X86Rdmsr(0x10, 0))
    assert (rdmsr.action, rdmsr.reply, rdmsr.claimed) == (RESUME, bytes(8), False)
    wrmsr = handle(machine, X86Wrmsr(0x10, 5, 0))
    assert (wrmsr.action, wrmsr.claimed) == (RESUME, False)


def test_interrupted_resumes(machine):
    assert handle(machine, Interrupted()).action == RESUME


@pytest.mark.parametrize("exit", [
    IoOut(0xE9, 3, 1, b"abc"),            # port I/O moves 1, 2 or 4 bytes
    IoOut(0xE9, 1, 0, b""),               # count 0
    IoOut(0xE9, 1, 2, b"a"),              # data shorter than size * count
    IoOut(0xE9, 4, 2000, bytes(8000)),    # more than KVM's one-page pio_data
    IoIn(0xE9, 8, 1, 0x1000),
    IoIn(0xE9, 1, -1, 0x1000),
    MmioRead(TESTDEV_BASE, 0),
    MmioRead(TESTDEV_BASE, 9),
    MmioWrite(TESTDEV_BASE, 16, bytes(16)),
], ids=repr)
def test_hostile_sizes_and_counts_raise_bus_error(machine, exit):
    with pytest.raises(BusError):
        handle(machine, exit)
    assert machine.console.data == b""


# --- VcpuRunner on a fake vCPU --------------------------------------------------------------------

LONG_SREGS = setup_mode("long", Sregs(), SimpleNamespace(write=lambda gpa, data: None),
                        ram_size=1 << 20).sregs
PROTECTED_SREGS = setup_mode("protected", Sregs(), SimpleNamespace(write=lambda gpa, data: None),
                             ram_size=1 << 20).sregs


class FakeVcpu:
    """Plays back `script` (exits, or callables returning one, or exceptions to raise); past
    its end it spins on IoOut to port 0x80, like a guest in an endless loop. A kick makes the
    next run() return Interrupted, as immediate_exit does."""

    id = 0

    def __init__(self, script=(), *, rip: int = 0x1000, sregs: Sregs = Sregs(), delay: float = 0.0):
        self.script = list(script)
        self.regs = Regs(rip=rip)
        self.sregs = sregs
        self.delay = delay
        self.kicked = False
        self.kicks = 0
        self.runs = 0
        self.completed: list[tuple] = []
        self.debug_calls: list[dict] = []
        self.sync_regs = None

    def run(self):
        if self.kicked:
            self.kicked = False
            return Interrupted()
        if self.delay:
            time.sleep(self.delay)
        self.runs += 1
        item = self.script.pop(0) if self.script else IoOut(0x80, 1, 1, b"\0")
        if isinstance(item, BaseException):
            raise item
        return item() if callable(item) else item

    def kick(self, thread_ident=None):
        self.kicks += 1
        self.kicked = True

    def complete_io_in(self, exit, data):
        self.completed.append(("in", exit.port, data))

    def complete_mmio_read(self, exit, data):
        self.completed.append(("mmio", exit.address, data))

    def complete_rdmsr(self, exit, value=0, error=False):
        self.completed.append(("rdmsr", exit.index, value, error))

    def get_regs(self):
        return self.regs

    def get_sregs(self):
        return self.sregs

    def get_debugregs(self):
        return DebugRegs()

    def enable_sync_regs(self, mask):
        self.sync_regs = mask

    @property
    def synced_rip(self):
        return self.regs.rip

    def set_guest_debug(self, enable=True, single_step=False, hw_breakpoints=()):
        self.debug_calls.append({"enable": enable, "single_step": single_step,
                                 "hw_breakpoints": tuple(hw_breakpoints)})

    def get_stats_fd(self):
        raise OSError("no stats fd on a fake vCPU")


@pytest.fixture
def runner_for(machine):
    def make(script=(), **kwargs) -> tuple[VcpuRunner, FakeVcpu]:
        vcpu = FakeVcpu(script, **kwargs)
        return machine.add_vcpu(vcpu), vcpu
    return make


def test_runner_asks_for_synced_registers_and_copes_without_stats(runner_for):
    runner, vcpu = runner_for([Hlt()])
    assert vcpu.sync_regs == 1  # KVM_SYNC_X86_REGS
    assert runner.counter_names == ()
    runner.run()
    assert runner.log.last.counters_after is None


def test_run_stops_at_hlt(runner_for, machine):
    runner, _ = runner_for([IoOut(0xE9, 1, 1, b"h"), IoOut(0xE9, 1, 1, b"i"), Hlt()])
    result = runner.run()
    assert result.stop_reason.startswith("HLT")
    assert isinstance(result.last_exit, Hlt)
    assert result.exits == 3 and runner.halted
    assert machine.console.data == b"hi"
    assert result.rip == 0x1000 and result.explanation is None


def test_in_and_mmio_reads_are_answered_before_the_next_entry(runner_for):
    runner, vcpu = runner_for([IoIn(0x3FD, 1, 1, 0x1000), MmioRead(TESTDEV_BASE, 4),
                               X86Rdmsr(0x1234, 0), Hlt()])
    runner.run()
    assert vcpu.completed[0][:2] == ("in", 0x3FD) and vcpu.completed[0][2][0] & 0x60
    assert vcpu.completed[1] == ("mmio", TESTDEV_BASE, MAGIC)
    assert vcpu.completed[2] == ("rdmsr", 0x1234, 0, True)  # unclaimed MSR: #GP


@pytest.mark.parametrize("until", [ExitReason.MMIO, MmioWrite])
def test_run_until_an_exit_reason_or_class(runner_for, until):
    runner, vcpu = runner_for([IoOut(0xE9, 1, 1, b"x"), MmioWrite(TESTDEV_BASE + 4, 4, bytes(4)),
                               Hlt()])
    result = runner.run(until=until)
    assert isinstance(result.last_exit, MmioWrite)
    assert result.stop_reason.startswith("reached MMIO write")
    assert result.exits == 2 and vcpu.script == [Hlt()]


def test_run_until_a_predicate_on_the_record(runner_for):
    runner, _ = runner_for([IoOut(0x80, 1, 1, b"\0"), IoOut(0x3F8, 1, 1, b"s"), Hlt()])
    result = runner.run(predicate=lambda record: record.device == "serial0")
    assert result.stop_reason == "predicate matched"
    assert runner.log.last.exit.port == 0x3F8 and result.exits == 2


def test_max_exits(runner_for):
    runner, _ = runner_for()  # an endless stream of port 0x80 writes
    result = runner.run(max_exits=5)
    assert result.stop_reason == "max_exits=5 reached" and result.exits == 5
    assert runner.log.histogram() == {"IO out": 5}


def test_debug_exit_device_stops_the_run_with_its_status(runner_for, machine):
    runner, vcpu = runner_for([IoOut(0xF4, 1, 1, b"\x03"), IoOut(0xE9, 1, 1, b"!"), Hlt()])
    result = runner.run()
    assert "isa-debug-exit" in result.stop_reason and "status 7" in result.stop_reason
    assert machine.exit_request.status == 7
    assert machine.console.data == b""  # nothing ran after the request
    assert vcpu.kicks == 1


def test_hostile_exit_becomes_a_stop_reason(runner_for):
    runner, vcpu = runner_for([IoOut(0xE9, 3, 1, b"abc"), Hlt()])
    result = runner.run()
    assert result.stop_reason.startswith("bad access from the guest (IO out port 0xe9 size 3")
    assert "1, 2, 4" in result.stop_reason
    assert vcpu.script == [Hlt()]


def test_undecodable_exit_becomes_a_stop_reason(runner_for):
    runner, _ = runner_for([ExitDecodeError("kvm_run.io.size is 3")])
    result = runner.run()
    assert "cannot be decoded" in result.stop_reason and "io.size is 3" in result.stop_reason


def test_interrupted_entries_are_recorded_but_not_counted(runner_for):
    runner, _ = runner_for([Interrupted(), IoOut(0xE9, 1, 1, b"x"), Interrupted(), Hlt()])
    result = runner.run()
    assert result.exits == 2
    assert runner.log.histogram() == {"INTR": 2, "IO out": 1, "HLT": 1}


def test_stop_from_another_thread(runner_for):
    runner, vcpu = runner_for(delay=0.001)
    timer = threading.Timer(0.05, runner.stop, ("the stop button",))
    timer.start()
    result = runner.run()
    timer.join()
    assert result.stop_reason == "the stop button"
    assert vcpu.kicks == 1 and result.exits > 0


def test_timeout(runner_for):
    runner, _ = runner_for(delay=0.001)
    result = runner.run(timeout=0.1)
    assert result.stop_reason == "timeout after 0.1 s"
    assert result.exits > 0 and result.seconds >= 0.1  # the guest ran until the timeout


def test_a_new_run_clears_the_previous_stop(runner_for):
    runner, _ = runner_for([IoOut(0xF4, 1, 1, b"\0"), IoOut(0xE9, 1, 1, b"x"), Hlt()])
    assert "isa-debug-exit" in runner.run().stop_reason
    result = runner.run()
    assert result.stop_reason.startswith("HLT") and result.exits == 2


def test_breakpoint_hit_names_its_register(runner_for):
    runner, vcpu = runner_for([Debug(1, 0x1003, 0xFFFF0FF2, 0x5)])
    runner.set_breakpoints([0x1001, 0x1003])
    assert vcpu.debug_calls[-1] == {"enable": True, "single_step": False,
                                    "hw_breakpoints": (0x1001, 0x1003)}
    assert runner.run().stop_reason == "breakpoint 1 at 0x1003"
    with pytest.raises(ValueError):
        runner.set_breakpoints(range(5))


def test_resuming_at_a_breakpoint_steps_off_it_first(runner_for):
    """At a breakpoint, run() single-steps once without breakpoints, then runs on."""
    runner, vcpu = runner_for([Debug(1, 0x1003, 0xFFFF4FF0, 0), IoOut(0xE9, 1, 1, b"x"), Hlt()],
                              rip=0x1001)
    runner.breakpoints = (0x1001,)
    result = runner.run()
    assert result.stop_reason.startswith("HLT") and result.exits == 3
    assert vcpu.debug_calls[0] == {"enable": True, "single_step": True, "hw_breakpoints": ()}
    assert vcpu.debug_calls[1]["hw_breakpoints"] == (0x1001,)


def test_shutdown_is_explained(runner_for):
    runner, _ = runner_for([Shutdown()], sregs=PROTECTED_SREGS)
    result = runner.run()
    assert result.stop_reason.startswith("SHUTDOWN")
    assert "triple fault" in result.explanation
    assert "no IDT (IDTR limit 0)" in result.explanation
    assert result.explanation in str(result)


def test_internal_error_disassembles_the_reported_bytes_in_the_cpu_mode(runner_for):
    cmpxchg16b = bytes.fromhex("480fc70c2500050000")  # cmpxchg16b [0x500], 64-bit
    runner, _ = runner_for([InternalError(1, (1, 0x0F), cmpxchg16b + b"\xf4")], rip=0x8000,
                           sregs=LONG_SREGS)
    text = runner.run().explanation
    assert "INTERNAL_ERROR EMULATION" in text and "data: 0x1 0xf" in text
    assert "64-bit code, bytes reported by KVM" in text
    assert "0x8000: 48 0f c7 0c 25 00 05 00 00  cmpxchg16b xmmword ptr [0x500]" in text


def test_internal_error_reads_code_from_memory_when_kvm_gave_none(runner_for, machine):
    machine.memory.write(0x7C00, bytes.fromhex("0f0b"))  # ud2
    runner, _ = runner_for([InternalError(3, (0x80000306, 0x30))], rip=0x7C00)
    text = runner.run().explanation
    assert "DELIVERY_EV" in text and "read from guest memory" in text
    assert "16-bit code" in text and "ud2" in text


BACKENDS = {b.module: b for b in (VMX, SVM, KVM_PVM)}


@pytest.mark.parametrize("backend", [VMX, SVM, KVM_PVM, TCG], ids=lambda b: b.label)
def test_shutdown_is_explained_from_what_the_backend_leaves(runner_for, backend):
    """VMX, kvm_pvm and tcg keep the vCPU where it faulted: its registers narrow the cause.
    SVM resets it (RIP 0xfff0): the explanation says the registers cannot tell."""
    reset = backend.triple_fault_state == "reset"
    runner, _ = runner_for([Shutdown()], rip=0xFFF0 if reset else 0x8003,
                           sregs=Sregs() if reset else PROTECTED_SREGS)
    runner.backend = backend
    text = runner.run().explanation
    assert text.startswith("SHUTDOWN: a triple fault")
    assert ("no IDT (IDTR limit 0)" in text and "RIP 0x8003" in text) != reset
    assert ("read as at reset (RIP 0xfff0)" in text) == reset


@pytest.mark.parametrize("backend", [VMX, SVM, KVM_PVM, TCG], ids=lambda b: b.label)
def test_an_emulation_failure_blames_the_emulator_only_where_it_runs_ring_0(runner_for, backend):
    runner, _ = runner_for([InternalError(1, (1,), bytes.fromhex("0f0b"))], rip=0x7C00)
    runner.backend = backend
    text = runner.run().explanation
    assert ("every kernel-mode (CPL0) instruction goes through KVM's emulator" in text) \
        == backend.emulates_kernel_mode


@pytest.mark.parametrize("module, code, words", [
    ("kvm_intel", 0x80000021, "VM-entry failure due to invalid guest state"),
    ("kvm_intel", 7, "VM entry with invalid control field(s)"),
    ("kvm_amd", (1 << 64) - 1, "SVM_EXIT_ERR"),
    ("kvm_pvm", 0x5, "backend specific"),
])
def test_fail_entry_is_decoded_for_the_backend(runner_for, module, code, words):
    runner, _ = runner_for([FailEntry(code, 3)])
    runner.backend = BACKENDS[module]
    result = runner.run()
    assert result.stop_reason.startswith("FAIL_ENTRY")
    assert words in result.explanation and f"{code:#x}" in result.explanation


PAGED_SREGS = setup_mode("paged", Sregs(), SimpleNamespace(write=lambda gpa, data: None),
                         ram_size=1 << 20).sregs


@pytest.mark.parametrize("sregs", [PAGED_SREGS, PAGED_SREGS.replace(cr0=PAGED_SREGS.cr0 & ~(1 << 31))],
                         ids=["PG set", "PG cleared by KVM after the fault"])
def test_kvm_pvm_explains_32bit_paging_shutdowns(runner_for, sregs):
    runner, _ = runner_for([Shutdown()], sregs=sregs)
    runner.backend = KVM_PVM
    assert "cannot run 32-bit paging" in runner.run().explanation
    runner, _ = runner_for([Shutdown()], sregs=LONG_SREGS)
    runner.backend = KVM_PVM
    assert "cannot run 32-bit paging" not in runner.run().explanation
