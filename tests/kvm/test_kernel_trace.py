"""KVM's tracepoints, per KVM_RUN, on real KVM (vlab.kvm.kernel_trace).

What the kernel shows inside KVM_RUN depends on the backend (vlab.kvm.backend): where it
emulates kernel-mode code (`emulates_kernel_mode`: kvm_pvm) each real-mode instruction is a
`kvm_emulate_insn`; where VM entries are traced (`traces_vm_entries`: VMX, SVM) each trip
out of the guest is a `kvm_exit` with the hardware's reason, handled in the kernel
(followed by `kvm_entry`) or passed to userspace (the run's last one). The tests branch on
those facts.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from guestlib import ORG, flat_real_mode
from test_multiboot_kernels import kernel  # noqa: F401  (the fixture that builds test kernels)
from vlab.kvm import Hlt, Interrupted, IoOut, MmioRead, Shutdown, detect_backend, host_address
from vlab.kvm.kernel_events import (KvmCpuid, KvmEmulateInsn, KvmEntry, KvmExit, KvmFpu,
                                    KvmInjException, KvmInjVirq, KvmMmio, KvmMsr, KvmPio,
                                    KvmUserspaceExit, KvmVcpuWakeup, RawEvent, decode)
from vlab.kvm import kernel_events
from vlab.kvm.kernel_trace import (TRACEFS_ENV, KernelTrace, KernelTraceUnavailable,
                                   kernel_trace_usable)
from vlab import Lab
from vlab.lab.stages import StageError
from vlab.machine.assembler import assemble

ROOT = Path(__file__).resolve().parents[2]
# The kernel's names (kvm_exit's print format) of the hardware exits these guests cause.
HARDWARE_EXIT = {"VMX": {"out": "IO_INSTRUCTION", "cpuid": "CPUID", "hlt": "HLT"},
                 "SVM": {"out": "io", "cpuid": "cpuid", "hlt": "hlt"}}

OUT_CPUID_HLT = """
    mov al, 1
    out 0x10, al        ; KVM_RUN 1 ends here: KVM_EXIT_IO
    mov eax, 0
    cpuid               ; answered inside KVM_RUN 2
    out 0x11, al        ; KVM_RUN 2 ends here
    hlt                 ; KVM_RUN 3: KVM_EXIT_HLT, or (irqchip) a sleep in the kernel
"""


def _usable() -> None:
    usable, why = kernel_trace_usable()
    if not usable:
        pytest.skip(why)


@pytest.fixture
def trace(kvm):
    _usable()
    with KernelTrace() as kt:
        yield kt


@pytest.fixture
def guest(kvm):
    """`guest(source, irqchip=False)`: (vm, vcpu) in flat real mode at ORG, closed after."""
    made = []

    def make(source: str, irqchip: bool = False):
        import mmap
        code = assemble(source, bits=16, org=ORG).code
        memory = mmap.mmap(-1, 0x8000)
        memory[ORG:ORG + len(code)] = code
        vm = kvm.create_vm()
        made.append((vm, memory))
        if irqchip:
            vm.create_irqchip()
        vm.set_user_memory_region(0, 0, len(memory), host_address(memory))
        vcpu = vm.create_vcpu(0)
        flat_real_mode(vcpu, ORG)
        return vm, vcpu

    yield make
    for vm, memory in made:
        vm.close()
        memory.close()


def run_traced(trace: KernelTrace, vcpu):
    """KVM_RUN once: the exit, and the kernel's events of that KVM_RUN."""
    since = trace.now()
    exit = vcpu.run()
    return exit, trace.take(threading.get_native_id(), since)


def hardware_exits(events) -> list[KvmExit]:
    return [e for e in events if isinstance(e, KvmExit)]


def check_run(events, backend, instruction: str, mnemonic: str, to_userspace: bool) -> None:
    """`instruction` ran inside this KVM_RUN as the backend runs it: emulated (kvm_pvm in
    real mode), or as a hardware exit that KVM handled itself (re-entered after it) or that
    ended the KVM_RUN (the last one)."""
    if backend.emulates_kernel_mode:
        assert mnemonic in [e.disassembly.split()[0] for e in events if isinstance(e, KvmEmulateInsn)]
    if not backend.traces_vm_entries:
        assert not hardware_exits(events)
        return
    exits = hardware_exits(events)
    names = [e.reason_name for e in exits]
    expected = HARDWARE_EXIT[backend.label][instruction]
    assert expected in names, names
    assert all(e.isa == backend.label for e in exits)
    if to_userspace:
        assert exits[-1].reason_name == expected
    else:
        index = max(i for i, e in enumerate(events) if isinstance(e, KvmExit) and e.reason_name == expected)
        assert any(isinstance(e, KvmEntry) for e in events[index:]), "handled: KVM re-entered"


def test_out_cpuid_and_hlt_each_in_their_own_kvm_run(trace, guest):
    backend = detect_backend()
    vm, vcpu = guest(OUT_CPUID_HLT)

    exit, events = run_traced(trace, vcpu)
    assert isinstance(exit, IoOut) and exit.port == 0x10
    assert isinstance(events[-1], KvmUserspaceExit) and events[-1].reason_name == "KVM_EXIT_IO"
    assert [(e.direction, e.port, e.value) for e in events if isinstance(e, KvmPio)] == [("out", 0x10, 1)]
    assert not any(isinstance(e, KvmCpuid) for e in events)
    check_run(events, backend, "out", "out", to_userspace=True)

    exit, events = run_traced(trace, vcpu)
    assert isinstance(exit, IoOut) and exit.port == 0x11
    cpuid = [e for e in events if isinstance(e, KvmCpuid)]
    assert [(c.function, c.index) for c in cpuid] == [(0, 0)], "the CPUID never reached userspace"
    assert [e.port for e in events if isinstance(e, KvmPio)] == [0x11]
    check_run(events, backend, "cpuid", "cpuid", to_userspace=False)
    assert events[-1].reason_name == "KVM_EXIT_IO"

    exit, events = run_traced(trace, vcpu)
    assert isinstance(exit, Hlt)
    assert events[-1].reason_name == "KVM_EXIT_HLT" and events[-1].errno == 0
    assert not any(isinstance(e, (KvmPio, KvmCpuid)) for e in events)
    check_run(events, backend, "hlt", "hlt", to_userspace=True)
    assert all(e.tid == threading.get_native_id() for e in events)
    assert [e.timestamp_ns for e in events] == sorted(e.timestamp_ns for e in events)
    assert trace.lost == 0


def test_hlt_with_the_in_kernel_irqchip_sleeps_until_the_kick(trace, guest):
    """With an in-kernel irqchip KVM keeps the HLT (the vCPU sleeps in vcpu_block); the
    KVM_RUN ends only when the signal of `kick` arrives: EINTR, and the HLT is inside it."""
    backend = detect_backend()
    vm, vcpu = guest("hlt", irqchip=True)
    timer = threading.Timer(0.2, vcpu.kick, (threading.get_ident(),))
    timer.start()
    exit, events = run_traced(trace, vcpu)
    timer.join()
    assert isinstance(exit, Interrupted)
    last = events[-1]
    assert isinstance(last, KvmUserspaceExit) and last.reason_name == "EINTR" and last.errno == -4
    check_run(events, backend, "hlt", "hlt", to_userspace=True)
    assert last.timestamp_ns - events[0].timestamp_ns > 100_000_000, "it slept until the kick"
    wakeups = [e for e in events if isinstance(e, KvmVcpuWakeup)]
    assert len(wakeups) == 1 and wakeups[0].waited and wakeups[0].ns > 100_000_000


def test_every_return_of_kvm_run_ends_with_kvm_userspace_exit(trace, guest):
    """immediate_exit (EINTR before entering) and an exit to userspace both close their
    KVM_RUN with kvm_userspace_exit, so one KVM_RUN's events never run into the next's."""
    vm, vcpu = guest("out 0x10, al\nhlt")
    vcpu.kick()
    exit, events = run_traced(trace, vcpu)
    assert isinstance(exit, Interrupted)
    assert [type(e) for e in events if isinstance(e, KvmUserspaceExit)] == [KvmUserspaceExit]
    assert events[-1].errno == -4 and not any(isinstance(e, KvmPio) for e in events)
    exit, events = run_traced(trace, vcpu)
    assert isinstance(exit, IoOut) and [e.port for e in events if isinstance(e, KvmPio)] == [0x10]


def test_events_of_other_ioctls_are_not_the_runs(trace, guest):
    """`since_ns` leaves out what the thread's other ioctls emitted before KVM_RUN: creating
    a vCPU writes its TSC offset (kvm_write_tsc_offset)."""
    tid = threading.get_native_id()
    for vcpu_id in (0, 1):
        vm, vcpu = guest("hlt")
        since = trace.now()
        assert isinstance(vcpu.run(), Hlt)
        events = trace.take(tid, since if vcpu_id else 0)
        names = [e.name for e in events]
        assert names[-1] == "kvm_userspace_exit"
        if vcpu_id == 0:      # everything the thread caused since the trace opened
            assert "kvm_write_tsc_offset" in names[:names.index("kvm_fpu")]
        else:
            assert "kvm_write_tsc_offset" not in names
            assert all(e.timestamp_ns >= since for e in events)


def test_what_kvm_did_itself_decodes_into_typed_records(trace, guest):
    """An MSR read, an MMIO read from unbacked memory and a #UD, each as the kernel traced it."""
    backend = detect_backend()
    vm, vcpu = guest("""
        mov ecx, 0xc0000080     ; EFER
        rdmsr
        mov al, [0x7ff0]        ; inside the slot: plain memory
        mov al, [0xf000]        ; no slot there: MMIO
        ud2
    """)
    exit, events = run_traced(trace, vcpu)
    assert isinstance(exit, MmioRead) and exit.address == 0xf000
    assert isinstance(events[0], KvmFpu) and events[0].load
    assert isinstance(events[-2], KvmFpu) and not events[-2].load
    msr = [e for e in events if isinstance(e, KvmMsr)]
    assert [(m.write, m.index, m.exception) for m in msr] == [(False, 0xc0000080, False)]
    mmio = [e for e in events if isinstance(e, KvmMmio)]
    assert [(m.kind, m.gpa, m.length) for m in mmio] == [("unsatisfied-read", 0xf000, 1)]
    assert events[-1].reason_name == "KVM_EXIT_MMIO"
    if backend.emulates_kernel_mode:
        insns = [e for e in events if isinstance(e, KvmEmulateInsn)]
        assert [e.disassembly for e in insns] == [
            "mov ecx, 0xc0000080", "rdmsr", "mov al, byte ptr [0x7ff0]", "mov al, byte ptr [0xf000]"]
        assert {e.mode for e in insns} == {"real"} and insns[1].insn == b"\x0f\x32"

    vcpu.complete_mmio_read(exit, b"!")
    exit, events = run_traced(trace, vcpu)
    assert [(m.kind, m.value) for m in events if isinstance(m, KvmMmio)] == [("read", 0x21)]
    injected = [e for e in events if isinstance(e, KvmInjException)]
    assert injected and injected[0].exception_name == "#UD" and injected[0].error_code is None
    if backend.emulates_kernel_mode:
        assert isinstance(exit, Shutdown), "no IVT entry for #UD here: triple fault"


# -- a Lab's records ---------------------------------------------------------------------------
def test_a_labs_exit_records_carry_their_kvm_runs_events(make_lab):
    _usable()
    backend = detect_backend()
    lab = make_lab(kernel_trace=True)
    lab.load_assembly(OUT_CPUID_HLT)
    lab.bring_up()
    step = lab.step()                          # mov al, 1: one instruction, one KVM_RUN
    stepped = lab.exits().last.kernel_events
    assert stepped[-1].reason_name == "KVM_EXIT_DEBUG"
    if backend.emulates_kernel_mode:
        assert [e.disassembly for e in stepped if isinstance(e, KvmEmulateInsn)] == ["mov al, 1"]
    assert step.rip_after == step.rip_before + 2
    result = lab.run()
    assert result.stop_reason.startswith("HLT")
    records = list(lab.exits())
    assert [r.reason for r in records] == ["DEBUG", "IO out", "IO out", "HLT"]
    assert [r.kernel_events[-1].reason_name for r in records] == [
        "KVM_EXIT_DEBUG", "KVM_EXIT_IO", "KVM_EXIT_IO", "KVM_EXIT_HLT"]
    assert [[(c.function, c.index) for c in r.kernel_events if isinstance(c, KvmCpuid)]
            for r in records] == [[], [], [(0, 0)], []]
    table = lab.exits().kernel_exit_table()
    assert table.runs == 4 and sum(row.userspace for row in table.rows) == 4
    rows = {row.reason: row for row in table.rows}
    if backend.emulates_kernel_mode:
        assert table.emulated >= 6
    if not backend.traces_vm_entries:   # no hardware exits: each KVM_RUN under its return
        assert (rows["KVM_EXIT_IO"].userspace, rows["KVM_EXIT_HLT"].userspace) == (2, 1)
        assert all(row.in_kernel == 0 for row in table.rows)
    else:
        names = HARDWARE_EXIT[backend.label]
        assert rows[names["out"]].userspace == 2 and rows[names["hlt"]].userspace == 1
        assert rows[names["cpuid"]].in_kernel == 1 and rows[names["cpuid"]].userspace == 0
    assert "exit reason" in str(table) and "4 KVM_RUNs traced" in str(table)
    frame = table.to_dataframe()
    assert list(frame.columns) == ["reason", "in_kernel", "userspace"] and frame.userspace.sum() == 4
    assert lab.kernel_trace.lost == 0


def test_a_lab_with_an_irqchip_keeps_the_hlt_in_the_kernel(make_lab):
    _usable()
    backend = detect_backend()
    lab = make_lab(kernel_trace=True, irqchip=True)
    lab.load_assembly("hlt")
    lab.bring_up()
    result = lab.run(timeout=0.3)
    assert result.stop_reason.startswith("timeout")
    last = lab.exits().last
    assert last.reason == "INTR" and last.kernel_events[-1].reason_name == "EINTR"
    table = {row.reason: row for row in lab.exits().kernel_exit_table().rows}
    if backend.emulates_kernel_mode:
        assert "hlt" in [e.disassembly for e in last.kernel_events if isinstance(e, KvmEmulateInsn)]
    if backend.traces_vm_entries:
        assert table[HARDWARE_EXIT[backend.label]["hlt"]].in_kernel >= 1
    assert table["EINTR"].userspace >= 1, "the kick's KVM_RUN ends in EINTR on every backend"


def test_each_vcpu_thread_gets_its_own_events(make_lab):
    """Two vCPUs run in threads made after the trace opened (event-fork follows them); each
    record holds only the events of the thread that ran its KVM_RUN."""
    _usable()
    lab = make_lab(kernel_trace=True, vcpus=2)
    lab.load_assembly("mov al, bl\nout 0x10, al\nhlt")     # rbx = the vCPU's index
    lab.bring_up()
    lab.run()
    tids = []
    for index, log in enumerate(lab.exit_logs):
        records = list(log)
        assert [r.reason for r in records] == ["IO out", "HLT"]
        threads = {e.tid for r in records for e in r.kernel_events}
        assert len(threads) == 1 and threads != {threading.get_native_id()}
        tids += threads
        pio = [e for e in records[0].kernel_events if isinstance(e, KvmPio)]
        assert [(p.port, p.value) for p in pio] == [(0x10, index)]
    assert len(set(tids)) == 2


def test_kernel_tracing_needs_the_kvm_accelerator(monkeypatch):
    with pytest.raises(ValueError, match="needs the kvm accelerator"):
        Lab(accel="tcg", kernel_trace=True)
    monkeypatch.setenv("VLAB_KVM_DEVICE", "/nonexistent")    # auto falls back to tcg
    lab = Lab(accel="auto", kernel_trace=True)
    with pytest.raises(StageError, match="needs the kvm accelerator"):
        lab.kvm_init()
    lab.close()


def _formats():
    with KernelTrace() as kt:
        return kt.formats


def _synthetic(formats, name: str, **values):
    """A record laid out as the running kernel's format file says, decoded: for the events
    these guests cannot cause here."""
    fmt = formats.named(name)
    items = [values.get(field, b"" if code.endswith("s") else 0)
             for field, code in zip(("common_pid",) + fmt.fields, _codes(fmt))]
    return decode(fmt, fmt.values(fmt.unpack(fmt.layout.pack(*items), 0)), 1, 0)


def _codes(fmt) -> list[str]:
    import re
    return [c for c in re.findall(r"\d*[a-zA-Z?]", fmt.layout.format[1:]) if not c.endswith("x")]


@pytest.mark.kvm
def test_symbol_tables_come_from_the_kernels_print_formats():
    _usable()
    formats = _formats()
    exit = _synthetic(formats, "kvm_exit", isa=1, exit_reason=30, guest_rip=0x1000, vcpu_id=1)
    assert (exit.isa, exit.reason_name, exit.rip, exit.vcpu_id) == ("VMX", "IO_INSTRUCTION", 0x1000, 1)
    assert _synthetic(formats, "kvm_exit", isa=2, exit_reason=0x7b).reason_name == "io"
    assert _synthetic(formats, "kvm_exit", isa=2, exit_reason=0x72).reason_name == "cpuid"
    assert _synthetic(formats, "kvm_exit", isa=1, exit_reason=12).reason_name == "HLT"
    other = _synthetic(formats, "kvm_exit", isa=7, exit_reason=0x12)
    assert (other.isa, other.reason_name) == ("isa 7", "0x12"), "no table claimed for another isa"
    insn = _synthetic(formats, "kvm_emulate_insn", rip=0x401000, len=3, flags=1 | 8,
                      insn=b"\x48\x89\xd8" + bytes(12))
    assert (insn.mode, insn.disassembly, insn.insn) == ("prot64", "mov rax, rbx", b"\x48\x89\xd8")
    assert _synthetic(formats, "kvm_emulate_insn", len=2, flags=1 | 4, insn=b"\x0f\xa2").mode == "prot32"
    assert _synthetic(formats, "kvm_userspace_exit", reason=2).reason_name == "KVM_EXIT_IO"
    assert _synthetic(formats, "kvm_userspace_exit", reason=5, errno=-4).reason_name == "EINTR"
    apic = _synthetic(formats, "kvm_apic", rw=1, reg=0xB0, val=0)
    assert (apic.write, apic.reg_name) == (True, "APIC_EOI")
    accept = _synthetic(formats, "kvm_apic_accept_irq", apicid=1, dm=4 << 8, tm=1, vec=2)
    assert (accept.delivery, accept.level_triggered, accept.vector) == ("NMI", True, 2)
    assert _synthetic(formats, "kvm_apic_ipi", icr_low=0x4500, dest_id=1).delivery == "INIT"
    gp = _synthetic(formats, "kvm_inj_exception", exception=13, has_error=1, error_code=0x18)
    assert (gp.exception_name, gp.error_code) == ("#GP", 0x18)
    assert _synthetic(formats, "kvm_mmio", type=2, len=4, gpa=0xfee000b0).kind == "write"
    virq = _synthetic(formats, "kvm_inj_virq", vector=0x20, soft=0)
    assert (virq.vector, virq.soft) == (0x20, False) and "IRQ vector 0x20" in virq.describe()
    assert _synthetic(formats, "kvm_set_irq", gsi=4, level=1, irq_source_id=0).gsi == 4
    cr = _synthetic(formats, "kvm_cr", rw=1, cr=4, val=0x20)
    assert (cr.write, cr.cr, cr.value) == (True, 4, 0x20)
    fault = _synthetic(formats, "kvm_page_fault", vcpu_id=0, guest_rip=0x8000,
                       fault_address=0xb8000, error_code=6)
    assert (fault.rip, fault.address, fault.error_code) == (0x8000, 0xb8000, 6)
    entry = _synthetic(formats, "kvm_entry", vcpu_id=0, rip=0x8000, immediate_exit=1)
    assert (entry.rip, entry.immediate_exit) == (0x8000, True)
    raw = _synthetic(formats, "kvm_halt_poll_ns", grow=1, vcpu_id=0, new=10000, old=0)
    assert isinstance(raw, RawEvent) and raw.name == "kvm_halt_poll_ns" and raw.fields["new"] == 10000
    for event in (exit, insn, apic, accept, gp, virq, cr, fault, entry, raw):
        assert event.describe().startswith(event.name + ":")
    typed = {cls.name for cls in vars(kernel_events).values()
             if isinstance(cls, type) and issubclass(cls, kernel_events.KernelEvent) and cls.name}
    assert typed <= {f.name for f in formats.by_id.values()}, "every typed event exists here"


# -- the instance's life ---------------------------------------------------------------------
def _instances(root: str, pid: int) -> list[str]:
    return [n for n in os.listdir(os.path.join(root, "instances")) if n.startswith(f"vlab-{pid}-")]


@pytest.mark.kvm
def test_no_instance_is_left_after_a_hundred_labs():
    _usable()
    root = None
    for _ in range(100):
        lab = Lab(accel="kvm", kernel_trace=True)
        lab.kvm_init()
        root = lab.kernel_trace.root
        assert os.path.isdir(lab.kernel_trace.path)
        lab.close()
        assert lab.kernel_trace is None
    dropped = KernelTrace()          # never closed: collected
    path = dropped.path
    del dropped
    assert not os.path.exists(path)
    assert _instances(root, os.getpid()) == []


@pytest.mark.kvm
def test_a_killed_processs_instance_is_removed_by_the_next_trace():
    _usable()
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom vlab.kvm.kernel_trace import KernelTrace\n"
         "t = KernelTrace()\nprint(t.path, flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        path = child.stdout.readline().strip()
        assert os.path.isdir(path)
    finally:
        child.kill()
        child.wait()
    assert os.path.isdir(path), "SIGKILL gave it no chance to remove it"
    with KernelTrace():
        assert not os.path.exists(path)


# -- where there is no tracefs ---------------------------------------------------------------
def test_without_tracefs_the_error_says_why_and_how_to_fix_it(monkeypatch, tmp_path):
    with pytest.raises(KernelTraceUnavailable) as raised:
        KernelTrace(tracing_dir="/nonexistent")
    assert "no tracefs at /nonexistent" in raised.value.reason
    assert "mount -t tracefs" in raised.value.fix and "fix:" in str(raised.value)
    with pytest.raises(KernelTraceUnavailable, match=f"no tracefs at {tmp_path} "):
        KernelTrace(tracing_dir=str(tmp_path))       # a directory, but not tracefs
    monkeypatch.setenv(TRACEFS_ENV, "/nonexistent")
    with pytest.raises(KernelTraceUnavailable):
        KernelTrace()
    usable, why = kernel_trace_usable()
    assert not usable and "/nonexistent" in why


def test_without_tracefs_a_lab_runs_untraced_and_a_traced_one_says_why(make_lab, monkeypatch):
    monkeypatch.setenv(TRACEFS_ENV, "/nonexistent")
    with pytest.raises(KernelTraceUnavailable, match="no tracefs at /nonexistent"):
        make_lab(kernel_trace=True).kvm_init()
    lab = make_lab()
    lab.load_assembly("mov al, 'k'\nout 0xe9, al\nhlt")
    lab.bring_up()
    assert lab.run().stop_reason.startswith("HLT") and lab.console == "k"
    assert lab.kernel_trace is None and lab.exits().last.kernel_events == ()


# -- the command line -------------------------------------------------------------------------
def vlab(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlab.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_vlab_run_kernel_trace_prints_the_kernels_table(kvm, tmp_path):
    _usable()
    backend = detect_backend()
    guest = tmp_path / "guest.asm"
    guest.write_text("bits 16\norg 0x8000\n" + OUT_CPUID_HLT)
    proc = vlab("run", str(guest), "--accel", "kvm", "--kernel-trace")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout.split("exits by reason inside KVM_RUN (KVM's tracepoints):\n")[1].splitlines()
    assert table[0].split() == ["exit", "reason", "in", "kernel", "to", "userspace"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:-2]}
    if backend.emulates_kernel_mode:
        assert rows == {"KVM_EXIT_IO": ["0", "2"], "KVM_EXIT_HLT": ["0", "1"]}
    else:
        names = HARDWARE_EXIT[backend.label]
        assert rows[names["out"]][1] == "2" and rows[names["cpuid"]] == ["1", "0"]
    assert table[-2].startswith("3 KVM_RUNs traced") and table[-1] == "kernel events lost: 0"


def test_vlab_run_kernel_trace_refuses_tcg_and_a_missing_tracefs(tmp_path):
    guest = tmp_path / "guest.asm"
    guest.write_text("hlt")
    proc = vlab("run", str(guest), "--accel", "tcg", "--kernel-trace")
    assert proc.returncode == 2 and "needs the kvm accelerator" in proc.stderr
    proc = vlab("run", str(guest), "--kernel-trace", VLAB_TRACEFS="/nonexistent")
    assert proc.returncode == 2 and "fix: mount tracefs" in proc.stderr
    proc = vlab("run", str(guest), "--accel", "tcg", VLAB_TRACEFS="/nonexistent")
    assert proc.returncode == 0, "without --kernel-trace nothing needs tracefs"


def test_vlab_doctor_has_a_kernel_trace_row():
    proc = vlab("doctor", VLAB_TRACEFS="/nonexistent")
    row = next(line for line in proc.stdout.splitlines() if "kernel trace" in line)
    assert row.split()[0] == "MISSING" and "no tracefs at /nonexistent" in row and "; fix: mount" in row


def test_a_multiboot_kernels_timer_interrupts_show_inside_kvm_run(kernel):
    """irqchip.asm halts until the in-kernel PIT's ticks (through the 8259) wake it: the HLT
    stays in the kernel, a tick wakes it (kvm_vcpu_wakeup) and, where VM entries are traced,
    KVM injects each tick's vector (kvm_inj_virq)."""
    _usable()
    backend = detect_backend()
    from vlab.accel import select
    from vlab.machine.pc import create_pc, load_kernel, run_vcpus
    accel = select("kvm")
    with KernelTrace() as trace:
        machine = create_pc(accel)
        try:
            machine.runners[0].kernel_trace = trace
            load_kernel(machine, kernel("irqchip"))
            run_vcpus(machine, timeout=30)
            assert machine.console.text.endswith("PASS\n")
            events = [e for record in machine.runners[0].log for e in record.kernel_events]
        finally:
            machine.close()
            accel.close()
    woken = [e for e in events if isinstance(e, KvmVcpuWakeup)]
    # waited in vcpu_block, or caught by halt polling: how often each depends on the host
    assert woken and all(e.valid for e in woken), "a tick woke the halted vCPU"
    if backend.traces_vm_entries:
        injected = [e for e in events if isinstance(e, KvmInjVirq)]
        assert len(injected) >= 5 and not any(e.soft for e in injected)


def test_vlab_run_multiboot_kernel_trace_has_a_table_per_vcpu(kernel):
    _usable()
    proc = vlab("run", "--multiboot", str(kernel("irqchip")), "--kernel-trace")
    assert proc.returncode == 1, proc.stdout + proc.stderr          # the kernel's PASS status
    report = proc.stdout.split("vCPU 0:")[1]
    assert "exits by reason inside KVM_RUN (KVM's tracepoints):" in report
    assert "KVM_RUNs traced" in report
    assert proc.stdout.rstrip().endswith("kernel events lost: 0")
