"""Exercise 5: a port-I/O device on the ISA bus (QEMU's MemoryRegionOps, kvm_handle_io).

The student writes `Checksum`, a device in vlab's sense (`vlab.devices.device.Device`: a
name, read and write by offset, and a state snapshot), and `wire(bus)`, which maps it at
BASE for SIZE ports. Writes to port BASE add a byte to an 8-bit sum; port BASE+1 reads the
sum, BASE+2 the number of bytes added, and a write to BASE+2 resets both. The check drives
the device directly, then wires it on a board's port bus, where a guest's IN and OUT reach
it through KVM_EXIT_IO and the run loop.
"""
from __future__ import annotations

from ..accel import select
from ..devices.bus import Bus
from ..devices.device import Device
from ..machine.assembler import assemble
from ..machine.builder import build_board
from .feedback import CheckFailed, call, passed

EXERCISE = "a port device on the bus"
BASE, SIZE = 0x700, 3
CONSOLE = 0xE9
CODE_GPA = 0x1000
DATA = b"KVM"
GUEST = f"""\
bits 16
org {CODE_GPA:#x}
    mov dx, {BASE:#x}
    mov si, data
    mov cx, {len(DATA)}
add_byte:
    lodsb
    out dx, al                ; BASE: add a byte
    loop add_byte
    inc dx
    in al, dx                 ; BASE+1: the sum
    out {CONSOLE:#x}, al
    inc dx
    in al, dx                 ; BASE+2: the count
    out {CONSOLE:#x}, al
    out dx, al                ; BASE+2: reset
    dec dx
    in al, dx                 ; the sum again: 0
    out {CONSOLE:#x}, al
    hlt
data: db "{DATA.decode()}"
"""
EXPECTED = bytes([sum(DATA) & 0xFF, len(DATA), 0])


def _device_problems(device) -> list[str]:
    """Drive the device by offsets, as the bus does, and compare with the specification."""
    if not isinstance(device, Device):
        missing = [m for m in ("name", "read", "write", "state") if not hasattr(device, m)]
        return [f"Checksum() lacks {', '.join(missing)}: a device has a name, read(offset, "
                f"size), write(offset, value, size) and state()."]
    steps = [("write", 0, 0x30), ("write", 0, 0x12), ("read", 1, 0x42), ("read", 2, 2),
             ("write", 0, 0xF0), ("read", 1, 0x32), ("write", 2, 0), ("read", 1, 0),
             ("read", 2, 0)]
    done = []
    for op, offset, value in steps:
        if op == "write":
            call(EXERCISE, device.write, offset, value, 1)
            done.append(f"write({offset}, {value:#x})")
            continue
        got = call(EXERCISE, device.read, offset, 1)
        if got != value:
            why = {1: "the sum of the bytes written at offset 0, modulo 256",
                   2: "how many bytes were added since the last reset"}[offset]
            hint = (" The bus hands a device offsets from its base (0, 1, 2), not port "
                    "numbers." if got in (None, 0, 0xFF) else "")
            return [f"after {', '.join(done)}: read({offset}) returned {got!r}, expected "
                    f"{value:#x} ({why}).{hint}"]
        done.append(f"read({offset})")
    if not isinstance(call(EXERCISE, device.state), dict):
        return ["state() should return a dict of the registers (e.g. sum and count)."]
    return []


def check_device(Checksum) -> None:  # noqa: N803 - the student's class
    """Drive the student's device by offsets, as a bus does."""
    problems = _device_problems(call(EXERCISE, Checksum))
    if problems:
        raise CheckFailed(EXERCISE, problems)
    passed(EXERCISE, ["the device answers its specification at offsets 0, 1 and 2"])


def check_wired_device(Checksum, wire) -> None:  # noqa: N803 - the student's class
    """Wire the student's device on a board's port bus and let a guest drive it."""
    accel = select("auto")
    machine = build_board(accel, memory="1M")
    try:
        device = call(EXERCISE, wire, machine.pio)
        unclaimed = [BASE + i for i in range(SIZE) if machine.pio.find(BASE + i) is None]
        if unclaimed or not isinstance(device, Checksum):
            raise CheckFailed(EXERCISE, [
                f"after wire(bus) the port bus is: {_map(machine.pio)}; "
                + (f"ports {', '.join(hex(p) for p in unclaimed)} are unclaimed (an IN from "
                   f"them reads all-ones): register the device at {BASE:#x} for {SIZE} ports"
                   if unclaimed else f"wire returned {device!r}: return the device it mapped")
                + "."])
        runner = machine.runners[0]
        machine.memory.write(CODE_GPA, assemble(GUEST).code)
        machine.setup_cpu(runner.vcpu, "real", CODE_GPA)
        result = runner.run(timeout=10)
        printed = machine.console.data
        if printed != EXPECTED:
            raise CheckFailed(EXERCISE, [
                f"the guest wrote {DATA!r} to port {BASE:#x} and read back sum, count, sum "
                f"after reset = {list(printed)}, expected {list(EXPECTED)}; the run "
                f"{result.stop_reason}."])
        passed(EXERCISE, [
            f"on {accel.backend.label}, wired at {BASE:#x}-{BASE + SIZE - 1:#x}, it served the "
            f"guest's OUTs and INs "
            f"(the run's exits: {machine.log.histogram()}); the guest printed {list(printed)}"])
    finally:
        machine.close()
        accel.close()


def _map(bus: Bus) -> str:
    return ", ".join(f"{name} [{base:#x}, {end:#x})" for base, end, name in bus.mappings())

