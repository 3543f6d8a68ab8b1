"""`vlab.Lab`: bring up a VM the way QEMU does, one stage per call, with a record of each.

    lab = vlab.Lab()            # accel="auto": kvm when /dev/kvm is usable, else tcg
    lab.next_stage()            # kvm_init, x86_cpu_realizefn, kvm_init_vcpu, ...
    lab.step(); lab.run()       # kvm_cpu_exec: one instruction, or until the guest stops

Every stage returns a `StageRecord`; calling one before what it needs exists raises
`StageError` naming the stage to run first.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from functools import partial

from ..accel import explain_auto
from ..kvm import Shutdown
from ..machine.assembler import assemble
from ..machine.board import Machine, check_ram_size
from ..machine.cpu_modes import CpuMode
from ..machine.examples import EXAMPLES
from ..machine.exitlog import ExitLog
from ..machine.explain import lme_refused
from ..machine.history import Snapshot, StepHistory, restore_snapshot, take_snapshot
from ..machine.loaders import load_elf, parse_elf, read_image
from ..machine.runloop import RunResult, StepResult, run_vcpus
from ..machine.snapshot import RegisterSnapshot
from . import bringup
from .bringup import GUEST_ORG, KERNEL_TRACE_NEEDS_KVM
from .cpuid import CpuidTable
from .cpus import LabCpu
from .pipeline import StagePipeline
from .records import StageRecord
from .registers import cpu_mode
from .stages import STAGES, StageError

RUN_RECORD_LIMIT = 64   # ioctls kept in the kvm_cpu_exec record (the rest are counted)


@dataclass
class Guest:
    """What pc_memory_init loads: code at an address, entered at `entry`."""
    name: str
    code: bytes
    load_address: int
    entry: int
    source: str | None = None
    assembly: object | None = None
    linux: tuple | None = None   # a Linux kernel's (initrd bytes or None, command line)
    boot: object | None = None   # its vlab.machine.linux.LinuxBoot, once in memory


def _release(machine, accel, kernel_trace) -> None:
    """What a Lab holds outside Python: the VM's fds and guest RAM (the machine, then the
    accelerator), and the kernel trace. A `weakref.finalize`, so a Lab dropped without
    close() gives them back at once, not when the cyclic collector gets to its parts."""
    for part in (machine, accel, kernel_trace):
        if part is not None:
            part.close()


class Lab(StagePipeline):
    """A VM brought up stage by stage, as QEMU's main thread and vCPU threads do.

    Subscribers (`lab.subscribe(callback)`) hear `event=` "stage" (with `stage=` its name),
    "step", "step_back", "run" and "restore", so views made before a stage existed can
    attach to what it created. One caller runs it at a time (`VcpuBusy` for another, e.g. a
    cell while a widget runs the guest); `close()` stops a run first and waits for it."""

    def __init__(self, accel: str = "auto", memory: int | str = "16M", cpu: str = "host",
                 vcpus: int = 1, mode: CpuMode | str = "real", irqchip: bool = False,
                 kernel_trace: bool = False):
        super().__init__()
        if vcpus < 1:
            raise ValueError(f"vcpus={vcpus}: a VM needs at least one vCPU")
        if kernel_trace and accel == "tcg":
            raise ValueError(KERNEL_TRACE_NEEDS_KVM)
        self.accel_choice = accel
        self.memory_size = check_ram_size(memory)
        self.cpu_model = cpu
        self.nr_vcpus = vcpus
        self.mode = CpuMode(mode)
        self.irqchip = irqchip
        self.kernel_trace_requested = kernel_trace
        self.kernel_trace = None     # a vlab.kvm.KernelTrace, from kvm_init when requested
        self.accel = None
        self.vm = None
        self.machine: Machine | None = None
        self.cpuid: CpuidTable | None = None
        self.cpus: list[LabCpu] = []    # one per vCPU, from kvm_init_vcpu
        self.guest: Guest | None = None
        self.backend = None
        self._msr_indices: list[int] = []            # KVM_GET_MSR_INDEX_LIST (kvm_init)
        self._feature_msr_indices: list[int] = []    # KVM_GET_MSR_FEATURE_INDEX_LIST
        self._history: StepHistory | None = None   # made with the machine (kvm_init)
        self._finalizer: weakref.finalize | None = None   # _release, from kvm_init

    # Each part of every vCPU, in vCPU order (views and lessons index them by vCPU).
    vcpus = property(lambda self: [cpu.vcpu for cpu in self.cpus])
    runners = property(lambda self: [cpu.runner for cpu in self.cpus])
    registers = property(lambda self: [cpu.registers for cpu in self.cpus])
    exit_logs = property(lambda self: [cpu.exits for cpu in self.cpus])

    def _state(self) -> dict:
        state: dict = {}
        if self.accel is not None:
            state["accelerator"] = self.accel.name
        if self._kvm():
            state["/dev/kvm fd"] = self.accel.kvm.fd
        if self._kvm() and self.vm is not None:
            state["VM fd"] = self.vm.vm.fd
        if self.cpuid is not None:
            state["CPUID entries"] = len(self.cpuid.entries)
        if self.vcpus:
            state["vCPUs"] = [f"vcpu{v.id}" + (f" fd={v.fd}" if self._kvm() else "") for v in self.vcpus]
        if self.machine is not None and self.machine.memory.regions:
            state["memory slots"] = [f"slot {r.slot}: {r.gpa:#x}+{r.size:#x} {r.kind}"
                                     for r in self.machine.memory.regions if r.slot is not None]
            state["devices"] = sorted(self.machine.devices)
        for vcpu in self.vcpus:
            snap = RegisterSnapshot.capture(vcpu)
            regs, sregs = snap.regs, snap.sregs
            state[f"vcpu{vcpu.id} registers"] = (
                f"{cpu_mode(snap)} mode, rip={regs.rip:#x} rsp={regs.rsp:#x} rbx={regs.rbx:#x} "
                f"cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} efer={sregs.efer:#x}")
        return state

    def _kvm(self) -> bool:
        return self.accel is not None and self.accel.capabilities.kernel

    # -- 1. kvm_init ---------------------------------------------------------------------------------
    def kvm_init(self) -> StageRecord:
        """Open the accelerator and create the VM (QEMU: kvm_init, then kvm_arch_init)."""
        self._check("kvm_init")
        # `auto` probes /dev/kvm on a throwaway fd first, as QEMU tries each accelerator in
        # turn; that probe is not part of the chosen accelerator's bring-up.
        choice, reason = explain_auto() if self.accel_choice == "auto" else (self.accel_choice, None)

        try:
            return self._stage("kvm_init", partial(bringup.kvm_init, self, choice=choice,
                                                   reason=reason))
        finally:  # what kvm_init opened, even if it failed half-way
            if self.accel is not None:
                self._finalizer = weakref.finalize(self, _release, self.machine, self.accel,
                                                   self.kernel_trace)

    # -- 2. x86_cpu_realizefn ----------------------------------------------------------------------
    def x86_cpu_realizefn(self) -> StageRecord:
        """Build the CPU model's CPUID table in userspace."""
        return self._stage("x86_cpu_realizefn", partial(bringup.x86_cpu_realizefn, self))

    # -- 3. kvm_init_vcpu ----------------------------------------------------------------------------
    def kvm_init_vcpu(self) -> StageRecord:
        """KVM_CREATE_VCPU and the kvm_run mapping, for every vCPU."""
        return self._stage("kvm_init_vcpu", partial(bringup.kvm_init_vcpu, self))

    # -- 4. kvm_arch_init_vcpu -------------------------------------------------------------------------
    def kvm_arch_init_vcpu(self) -> StageRecord:
        """TSC frequency, KVM_SET_CPUID2, feature MSRs."""
        return self._stage("kvm_arch_init_vcpu", partial(bringup.kvm_arch_init_vcpu, self))

    # -- 5. pc_memory_init ----------------------------------------------------------------------------
    def pc_memory_init(self) -> StageRecord:
        """Guest RAM into memory slots, the guest loaded, the board's devices."""
        return self._stage("pc_memory_init", partial(bringup.pc_memory_init, self))

    # -- 6. kvm_arch_put_registers -------------------------------------------------------------------
    def kvm_arch_put_registers(self) -> StageRecord:
        """The reset state of the chosen CPU mode, into every vCPU."""
        return self._stage("kvm_arch_put_registers", partial(bringup.kvm_arch_put_registers, self))

    # -- guests -------------------------------------------------------------------------------------
    def load_example(self, name: str | None = None) -> Guest:
        """One of the shipped self-checking guests (default: the one for this Lab's mode)."""
        example = EXAMPLES[name or self.mode.value]
        if example.mode != self.mode.value and CpuMode(example.mode) is not self.mode:
            raise ValueError(f"example {example.name!r} needs mode {example.mode!r}; "
                             f"this Lab is in {self.mode.value!r}")
        return self.load_assembly(example.source(), org=example.org, name=f"example {example.name}")

    def load_assembly(self, source: str, org: int = GUEST_ORG, name: str = "assembly") -> Guest:
        """Assemble `source` with nasm for this Lab's mode and load it at `org`."""
        assembly = assemble(source, bits=self.mode.bits, org=org)
        self.guest = Guest(name, assembly.code, org, org, source, assembly)
        self._write_guest_if_ready()
        return self.guest

    def load_elf(self, image) -> Guest:
        """An ELF executable: its PT_LOAD segments at their physical addresses."""
        data = read_image(image)
        parse_elf(data)  # refused now, not at pc_memory_init
        self.guest = Guest("elf", data, 0, 0)
        self._write_guest_if_ready()
        return self.guest

    def load_linux(self, kernel, initrd=None, append: str = "") -> Guest:
        """A Linux kernel with its initrd and command line, as QEMU's -kernel -initrd
        -append: a bzImage, or an ELF vmlinux with a PVH note (vlab.machine.linux). It is
        loaded at pc_memory_init and entered at kvm_arch_put_registers the boot protocol's
        way. Linux needs KVM with the in-kernel irqchip and PIT, and RAM:
        `vlab.Lab(irqchip=True, memory="256M")`."""
        from ..machine.linux import plan_linux
        if not self.irqchip:
            raise ValueError("Linux needs the in-kernel irqchip and PIT (its timer interrupts "
                             "and serial console): create the Lab with irqchip=True")
        if self.nr_vcpus != 1:
            raise ValueError(f"vcpus={self.nr_vcpus}: a Lab boots Linux on one vCPU (the "
                             f"boot protocol enters the bootstrap processor only)")
        self._check_linux_accel()
        data = read_image(kernel)
        blob = read_image(initrd) if initrd is not None else None
        boot, _ = plan_linux(data, blob, append, self.memory_size)  # refused now, not later
        self.guest = Guest("linux", data, boot.kernel[0][0], boot.entry, linux=(blob, append))
        self._write_guest_if_ready()
        return self.guest

    def _check_linux_accel(self) -> None:
        if self.accel is not None and not self.accel.capabilities.kernel:
            raise StageError(f"Linux needs KVM: its timer and interrupts come from KVM's "
                             f"in-kernel irqchip and PIT, which the software accelerator "
                             f"lacks ({self.accel.reason})")

    def _write_guest_if_ready(self) -> None:
        self._check_open()
        if "memory" in self.provided:
            with self.ownership.claim("loading a guest"):
                self._write_guest()

    def _write_guest(self) -> None:
        guest = self.guest
        if guest.name == "elf":
            loaded = load_elf(self.machine.memory, guest.code)
            guest.entry = loaded.entry
            guest.load_address = loaded.segments[0][0] if loaded.segments else 0
        elif guest.linux is not None:
            from ..machine.linux import enter_linux, load_linux_image
            self._check_linux_accel()
            guest.boot = load_linux_image(self.machine.memory, guest.code, *guest.linux,
                                          ram_size=self.memory_size)
            if "registers" in self.provided:   # loaded after bring-up: enter it now
                enter_linux(self.vcpus[0], self.machine.memory, guest.boot)
                self.registers[0].refresh(self.vcpus[0])
        else:
            self.machine.memory.write(guest.load_address, guest.code)

    # -- 7. kvm_cpu_exec ------------------------------------------------------------------------------
    def kvm_cpu_exec(self, **run_options) -> StageRecord:
        """Run the guest (the first `run()`), recording the loop's ioctls: the first
        RUN_RECORD_LIMIT kept, the rest counted while the loop goes on compiled where it
        can. Subscribers hear of it once, as this stage, when its record is complete."""
        def body(record: StageRecord) -> None:
            before = [runner.kernel_counters() for runner in self.runners]
            result = self._run(notify=False, **run_options)
            starts = sum(runner.kernel_counters().get("emu_starts", 0) - b.get("emu_starts", 0)
                         for runner, b in zip(self.runners, before))
            record.actions += self.accel.stage_actions("kvm_cpu_exec", emu_starts=starts)
            record.notes.append(str(result) if not isinstance(result, list)
                                else "; ".join(f"vcpu{i}: {r}" for i, r in enumerate(result)))

        return self._stage("kvm_cpu_exec", body, ioctl_limit=RUN_RECORD_LIMIT)

    def run(self, vcpu: int | None = None, **options) -> RunResult | list[RunResult]:
        """Run until the guest stops (HLT, fatal exit, breakpoint) or `until`, `predicate`,
        `max_exits`, `timeout` says so; Ctrl-C / the stop button stops it cleanly. With
        several vCPUs and no `vcpu`, each runs in its own thread (`run_vcpus`). A stop()
        from the moment this is called stops the run (the vCPUs are armed at once)."""
        with self.ownership.claim("run()"), contextlib.ExitStack() as armed:
            for runner in self.runners:
                armed.enter_context(runner.armed())
            if "kvm_cpu_exec" not in self.records:
                self.kvm_cpu_exec(vcpu=vcpu, **options)
                return self.last_run
            return self._run(vcpu=vcpu, **options)

    def _run(self, vcpu: int | None = None, notify: bool = True, **options):
        self._check_ready()
        self._history.clear()
        if vcpu is not None or self.nr_vcpus == 1:
            index = vcpu or 0
            result = self._cpu(index).runner.run(**options)
            indexed = [(index, result)]
        else:
            result = run_vcpus(self.runners, self.accel.name, options).results
            indexed = list(enumerate(result))
        for index, each in indexed:
            self._explain_lme_refused(index, each)
            self.registers[index].refresh(self.vcpus[index])
        self.last_run = result
        if notify:
            self.notify(event="run")
        return result

    def _explain_lme_refused(self, index: int, result: RunResult) -> None:
        """A SHUTDOWN on a CPU model without lm may be KVM refusing EFER.LME: say so."""
        if result.last_exit.__class__ is Shutdown and not self.cpuid.has("lm"):
            why = lme_refused(self.vcpus[index], self.machine.read_physical)
            if why:
                result.stop_reason = f"SHUTDOWN: {why}"

    def stop(self, cause: str = "stopped") -> None:
        """Stop every running vCPU (from any thread)."""
        for runner in self.runners:
            runner.stop(cause)

    def _check_ready(self) -> None:
        self._check_open()
        if "registers" not in self.provided:
            missing = [s.name for s in STAGES[:-1] if s.name not in self.records]
            raise StageError(f"the guest cannot run yet: do {', '.join(missing)} first "
                             f"(lab.bring_up() does them all)")

    # -- stepping ----------------------------------------------------------------------------------
    def step(self, vcpu: int = 0) -> StepResult:
        """Execute one instruction and show what changed (undo with `step_back()`)."""
        with self.ownership.claim("step()"):
            self._check_ready()
            cpu = self._cpu(vcpu)
            before = self._history.before_step(vcpu, cpu.vcpu)
            result = cpu.runner.step()
            self._history.after_step(vcpu, before)
            cpu.registers.update(result.after)
            self.notify(event="step")
            return result

    def break_at(self, *addresses: int, vcpu: int = 0) -> None:
        """Hardware breakpoints (up to four) at guest linear addresses; none clears them."""
        with self.ownership.claim("break_at()"):
            self._check_ready()
            self._cpu(vcpu).runner.set_breakpoints(addresses)

    def step_back(self) -> RegisterSnapshot:
        """Undo the last `step()`: registers and the memory it wrote."""
        with self.ownership.claim("step_back()"):
            if self._history is None or not len(self._history):
                raise StageError("nothing to step back: no step() since the last run() or "
                                 "restore()")
            vcpu = self._history.undo(self.vcpus)
            snapshot = RegisterSnapshot.capture(self.vcpus[vcpu])
            self.registers[vcpu].update(snapshot)
            self.notify(event="step_back")
            return snapshot

    # -- snapshot / restore ----------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Save every vCPU's state and guest memory."""
        with self.ownership.claim("snapshot()"):
            self._check_ready()
            return take_snapshot(self.machine, self.vcpus, self._msr_indices)

    def restore(self, snapshot: Snapshot) -> None:
        """Put the VM back exactly as `snapshot` found it (registers and memory). IA32_TSC is
        written back too, but KVM may take that as a TSC synchronisation and keep counting."""
        with self.ownership.claim("restore()"):
            self._check_ready()
            restore_snapshot(self.machine, self.vcpus, snapshot)
            self._history.clear()
            for model, vcpu in zip(self.registers, self.vcpus):
                model.refresh(vcpu)
            self.notify(event="restore")

    # -- what the guest sees ----------------------------------------------------------------------
    def guest_cpuid(self, leaf: int, subleaf: int = 0) -> dict[str, int]:
        """What the guest's CPUID instruction returns for this Lab's table, measured by
        running it in a throwaway VM on the same accelerator (the table says one thing; on
        some backends the hardware answers another)."""
        from .probe import probe_cpuid
        self._check_open()
        if self.cpuid is None:
            raise StageError("no CPU model yet: call lab.x86_cpu_realizefn() first")
        return probe_cpuid(self.accel, self.cpuid.entries, [(leaf, subleaf)])[0]

    # -- conveniences ------------------------------------------------------------------------------
    @property
    def console(self) -> str:
        return self.machine.console.text if self.machine else ""

    def exits(self, vcpu: int = 0) -> ExitLog:
        """vCPU `vcpu`'s exits (still readable after close())."""
        return self._cpu(vcpu).exits

    def _cpu(self, index: int) -> LabCpu:
        if not self.cpus:
            raise StageError("no vCPU yet: kvm_init_vcpu creates them (lab.next_stage())")
        if not 0 <= index < len(self.cpus):
            raise ValueError(f"vcpu={index}: this Lab has vCPUs 0 to {len(self.cpus) - 1}")
        return self.cpus[index]

    def memory(self, gpa: int, size: int) -> bytes:
        self._check_open()
        if "memory" not in self.provided:
            raise StageError("no guest memory yet: pc_memory_init maps it (lab.next_stage())")
        return self.machine.memory.read(gpa, size)

    def close(self) -> None:
        """Stop a run in progress (from any thread) and wait for it, then close the VM."""
        self.ownership.close(lambda: self.stop("the Lab was closed"))
        if self._finalizer is not None:
            self._finalizer()
        self.machine = self.accel = self.kernel_trace = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __str__(self) -> str:
        lines = [f"vlab.Lab(accel={self.accel_choice!r}, memory={self.memory_size >> 20}M, "
                 f"cpu={self.cpu_model!r}, vcpus={self.nr_vcpus}, mode={self.mode.value!r})"
                 + (": this Lab is closed" if self.closed else "")]
        for row in self.stages:
            mark = {"done": "x", "next": ">", "waiting": " "}[row["status"]]
            lines.append(f"  [{mark}] {row['stage']:<24} {row['title']}")
        return "\n".join(lines)

    __repr__ = __str__
