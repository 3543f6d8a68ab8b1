"""A bounded fuzz of what a hostile guest and a careless learner give the lab: random guest
bytes, register values and orders of API calls, on tcg and (where /dev/kvm is usable) on
KVM. Every example ends in a decoded outcome (a `RunResult` or `StepResult`) or a vlab
error, never another exception, a crash or a hang.

Each fuzzer runs in a child interpreter (`isolated`), so a crash in Unicorn or in the
kernel interface fails one test instead of the run. Hypothesis is derandomized (the same
examples on every run, so CI is reproducible) and small: the whole file takes seconds.
"""
from __future__ import annotations

import shutil

import pytest

from vlab import Lab, StageError
from vlab.kvm import KvmError
from vlab.lab.cpuid import CpuidFrozen
from vlab.machine.assembler import AssemblyError
from vlab.machine.runloop import RunResult, StepResult, VcpuBusy, VcpuHalted

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed")

ACCELS = ["tcg", pytest.param("kvm", marks=pytest.mark.kvm)]
# What the lab raises for input it refuses: stage order (StageError), the kernel (KvmError),
# bad values (ValueError: SregsError, LoadError, GuestMemoryError, ...), nasm, a frozen table,
# a vCPU another caller runs or one asleep in the kernel.
VLAB_ERRORS = (StageError, KvmError, ValueError, AssemblyError, CpuidFrozen, VcpuBusy,
               VcpuHalted)
MODES = ("real", "protected", "long")
RUN_BUDGET = {"max_exits": 20, "timeout": 0.1}   # per run: a spinning guest ends in time
EXAMPLES = {"guest_bytes": 40, "registers": 40, "api_orders": 25}


def outcome(call, decoded: bool = False):
    """Call it; return what it returned or the vlab error it raised. Anything else escapes
    and fails the example. `decoded`: a run or a step, whose result must be a `RunResult`
    or `StepResult` (a list of them for several vCPUs) with a stop reason."""
    try:
        result = call()
    except VLAB_ERRORS as error:
        return error
    if decoded:
        for one in result if isinstance(result, list) else [result]:
            assert isinstance(one, (RunResult, StepResult)), repr(one)
            assert not isinstance(one, RunResult) or one.stop_reason, one
    return result


class Labs:
    """One brought-up Lab per CPU mode, put back to the same snapshot before each example."""

    def __init__(self, accel: str):
        self.accel = accel
        self.labs: dict[str, tuple[Lab, object]] = {}

    def fresh(self, mode: str) -> Lab:
        if mode not in self.labs:
            lab = Lab(accel=self.accel, memory="2M", mode=mode)
            lab.load_assembly("hlt")
            lab.bring_up()
            lab.run()   # the kvm_cpu_exec stage is done: later runs are plain runs
            self.labs[mode] = (lab, lab.snapshot())
        lab, snapshot = self.labs[mode]
        lab.restore(snapshot)
        return lab

    def close(self) -> None:
        for lab, _ in self.labs.values():
            lab.close()


def run_and_step(lab: Lab, steps: int) -> None:
    for _ in range(steps):
        outcome(lab.step, decoded=True)
    outcome(lambda: lab.run(**RUN_BUDGET), decoded=True)
    lab.vcpus[0].get_regs()   # the vCPU is still there to be asked


def fuzz_guest_bytes(accel: str) -> None:
    """Random short code at the entry point, stepped and run with a budget."""
    from hypothesis import given, settings, strategies as st
    labs = Labs(accel)

    @settings(max_examples=EXAMPLES["guest_bytes"], deadline=None, derandomize=True,
              database=None)
    @given(mode=st.sampled_from(MODES), code=st.binary(min_size=1, max_size=16),
           steps=st.integers(0, 3))
    def example(mode, code, steps):
        print(mode, code.hex(), steps, flush=True)   # the examples so far, if the child hangs
        lab = labs.fresh(mode)
        lab.machine.memory.write(lab.guest.entry, code)
        vcpu = lab.vcpus[0]
        vcpu.set_regs(vcpu.get_regs())   # the host wrote code: translated code is dropped
        run_and_step(lab, steps)

    try:
        example()
    finally:
        labs.close()


def fuzz_registers(accel: str) -> None:
    """Register values in and out of range, one general-purpose and one special register
    per example, then a step and a run."""
    from hypothesis import given, settings, strategies as st
    from vlab.kvm.state import GPR_NAMES
    labs = Labs(accel)
    wide = st.one_of(st.integers(0, (1 << 64) - 1), st.integers(-(1 << 65), 1 << 66),
                     st.sampled_from([0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1]))
    control = ("cr0", "cr3", "cr4", "cr8", "efer", "apic_base")
    segment = ("cs", "ds", "ss", "tr")
    fields = ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g")

    @settings(max_examples=EXAMPLES["registers"], deadline=None, derandomize=True,
              database=None)
    @given(mode=st.sampled_from(MODES), gpr=st.sampled_from(GPR_NAMES + ("rip", "rflags")),
           gpr_value=wide, special=st.sampled_from(control + segment + ("idt", "gdt")),
           field=st.sampled_from(fields), bit=st.integers(0, 63), special_value=wide,
           flip=st.booleans(), steps=st.integers(0, 2))
    def example(mode, gpr, gpr_value, special, field, bit, special_value, flip, steps):
        print(mode, gpr, gpr_value, special, field, bit, special_value, flip, steps, flush=True)
        lab = labs.fresh(mode)
        vcpu = lab.vcpus[0]
        outcome(lambda: vcpu.set_regs(vcpu.get_regs().replace(**{gpr: gpr_value})))
        sregs = vcpu.get_sregs()
        if special in control:
            value = getattr(sregs, special) ^ (1 << bit) if flip else special_value
            changed = sregs.replace(**{special: value})
        else:
            part = getattr(sregs, special)
            name = field if special in segment else ("base", "limit")[bit & 1]
            value = getattr(part, name) ^ (1 << bit) if flip else special_value
            changed = sregs.replace(**{special: part.replace(**{name: value})})
        outcome(lambda: vcpu.set_sregs(changed))
        run_and_step(lab, steps)

    try:
        example()
    finally:
        labs.close()


OPERATIONS = ("next_stage", "bring_up", "load_assembly", "load_bad_assembly", "run", "step",
              "step_back", "snapshot", "restore", "break_at", "stop", "memory", "exits",
              "close")


def fuzz_api_orders(accel: str) -> None:
    """The Lab's calls in random orders on fresh Labs, closing included."""
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=EXAMPLES["api_orders"], deadline=None, derandomize=True,
              database=None)
    @given(vcpus=st.integers(1, 2), mode=st.sampled_from(MODES),
           calls=st.lists(st.sampled_from(OPERATIONS), max_size=10))
    def example(vcpus, mode, calls):
        print(vcpus, mode, calls, flush=True)
        lab = Lab(accel=accel, memory="2M", vcpus=vcpus, mode=mode)
        snapshots = []
        actions = {
            "next_stage": lab.next_stage, "bring_up": lab.bring_up,
            "load_assembly": lambda: lab.load_assembly("inc ax\nout 0xe9, al\nhlt"),
            "load_bad_assembly": lambda: lab.load_assembly("mov ax, ["),
            "run": lambda: lab.run(**RUN_BUDGET), "step": lab.step,
            "step_back": lab.step_back, "snapshot": lambda: snapshots.append(lab.snapshot()),
            "restore": lambda: lab.restore(snapshots[-1]) if snapshots else None,
            "break_at": lambda: lab.break_at(0x8001), "stop": lab.stop,
            "memory": lambda: lab.memory(0x8000, 4), "exits": lambda: str(lab.exits()),
            "close": lab.close,
        }
        try:
            for call in calls:
                outcome(actions[call], decoded=call in ("run", "step"))
        finally:
            lab.close()

    example()


FUZZERS = {"guest_bytes": fuzz_guest_bytes, "registers": fuzz_registers,
           "api_orders": fuzz_api_orders}


@pytest.mark.watchdog(330)
@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("fuzzer", FUZZERS)
def test_fuzz(isolated, accel, fuzzer):
    done = isolated(f"""
        import sys
        sys.path.insert(0, "tests/reliability")
        import test_fuzz
        test_fuzz.{FUZZERS[fuzzer].__name__}({accel!r})
        print("ok")
    """, timeout=300)   # seconds here; an emulated KVM host is 10-25 times slower
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
