"""The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command), as QEMU's
hw/input/pckbd.c has it, with nothing plugged into its two PS/2 ports.

Linux's i8042 driver probes it (self-test, the command byte, the AUX port's loopback and
its IRQ 12) and `reboot=k` resets the machine through it: command 0xFE pulses the CPU's
reset line. Names follow Linux's drivers/input/serio/i8042.h.

    port 0x64 read    status: OBF (bit 0), IBF (1, always clear: commands are taken at
                      once), SYS (2), CMD (3, the last write was a command), UNLOCKED (4),
                      AUXDATA (5, the byte came from the AUX port), TIMEOUT (6)
    port 0x64 write   a command; those that take a byte get it from the next 0x60 write
    port 0x60 read    the output buffer (clears OBF; the next queued byte follows)
    port 0x60 write   a command's byte, else a byte for the keyboard

Commands: 0x20 read and 0x60 write the command byte (CTR: KBDINT, AUXINT, SYS, KBDDIS,
AUXDIS, XLATE); 0xA7/0xA8 disable/enable AUX, 0xAD/0xAE the keyboard; 0xA9/0xAB test the AUX
and keyboard interfaces (0x00: good); 0xAA self-test (0x55, sets SYS); 0xD0/0xD1 read/write
the output port (bit 0 low resets, bit 1 is A20); 0xD2/0xD3 put a byte in the output
buffer as if from the keyboard/AUX port (AUX loopback: Linux's AUX detection); 0xD4 sends
the next byte to the AUX device; 0xF0-0xFF pulse output lines (0xFE: bit 0, the reset).
A20 needs no gate under KVM (see reset.py), so output port bit 1 is only stored.

No keyboard or mouse is attached: a byte sent to either device is answered as a real
controller answers for an empty port, 0xFE with TIMEOUT set (and AUXDATA for the AUX
port), so Linux's atkbd and psmouse give up at once instead of waiting for replies.
Output bytes raise IRQ 1 (keyboard) or IRQ 12 (AUX) while the CTR enables them;
`irq(line, level)` drives them (KVM_IRQ_LINE), only on changes. A reset asks `on_reset`.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

DATA_PORT, COMMAND_PORT = 0x60, 0x64
KBD_IRQ, AUX_IRQ = 1, 12

I8042_STR_OBF = 0x01
I8042_STR_IBF = 0x02
I8042_STR_SYSFLAG = 0x04
I8042_STR_CMDDAT = 0x08
I8042_STR_KEYLOCK = 0x10     # set: the keyboard is not inhibited
I8042_STR_AUXDATA = 0x20
I8042_STR_TIMEOUT = 0x40

I8042_CTR_KBDINT = 0x01
I8042_CTR_AUXINT = 0x02
I8042_CTR_SYS = 0x04
I8042_CTR_KBDDIS = 0x10
I8042_CTR_AUXDIS = 0x20
I8042_CTR_XLATE = 0x40

CMD_CTL_RCTR, CMD_CTL_WCTR = 0x20, 0x60
CMD_AUX_DISABLE, CMD_AUX_ENABLE, CMD_AUX_TEST = 0xA7, 0xA8, 0xA9
CMD_CTL_TEST, CMD_KBD_TEST, CMD_KBD_DISABLE, CMD_KBD_ENABLE = 0xAA, 0xAB, 0xAD, 0xAE
CMD_READ_OUTPORT, CMD_WRITE_OUTPORT = 0xD0, 0xD1
CMD_KBD_LOOP, CMD_AUX_LOOP, CMD_AUX_SEND = 0xD2, 0xD3, 0xD4
CMD_PULSE_FIRST = 0xF0
CMD_RESET = 0xFE             # pulse output line 0: the CPU's reset

RET_CTL_TEST = 0x55
RET_INTERFACE_OK = 0x00
RET_NO_DEVICE = 0xFE

OUTPORT_RESET = 0x01         # high: the CPU runs; low: held in reset
OUTPORT_A20 = 0x02
_TAKES_DATA = (CMD_CTL_WCTR, CMD_WRITE_OUTPORT, CMD_KBD_LOOP, CMD_AUX_LOOP, CMD_AUX_SEND)


class I8042:
    """The controller's registers and output queue; `irq(line, level)` for IRQ 1 and 12,
    `on_reset(cause)` when the guest resets the CPU through it."""

    IOBASE, SIZE = DATA_PORT, 5      # 0x60-0x64; 0x61-0x63 are not the controller's

    def __init__(self, irq: Callable[[int, int], None] | None = None,
                 on_reset: Callable[[str], None] | None = None, name: str = "i8042") -> None:
        self.name = name
        self._irq = irq
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, int]] = deque()   # (byte, status bits it brings)
        self.levels = {KBD_IRQ: 0, AUX_IRQ: 0}
        self.reset()

    def reset(self) -> None:
        """QEMU's kbd_reset: interrupts enabled, nothing queued, the CPU's lines high."""
        self.ctr = I8042_CTR_KBDINT | I8042_CTR_AUXINT
        self.status = I8042_STR_CMDDAT | I8042_STR_KEYLOCK
        self.outport = OUTPORT_RESET | OUTPORT_A20
        self.pending = None      # a command waiting for its data byte
        self.data = 0            # what 0x60 reads once the queue is empty
        self._queue.clear()
        self._update()

    # -- the guest's side ---------------------------------------------------------------

    def read(self, offset: int, size: int = 1) -> int:
        with self._lock:
            if offset == COMMAND_PORT - DATA_PORT:
                return self.status
            if offset != 0:
                return 0xFF
            if self._queue:
                self.data, _ = self._queue.popleft()
            self._update()
            return self.data

    def write(self, offset: int, value: int, size: int = 1) -> None:
        value &= 0xFF
        with self._lock:
            if offset == COMMAND_PORT - DATA_PORT:
                self.status |= I8042_STR_CMDDAT
                cause = self._command(value)
            elif offset == 0:
                self.status &= ~I8042_STR_CMDDAT
                cause = self._data(value)
            else:
                return
            self._update()
        if cause is not None and self._on_reset is not None:
            self._on_reset(cause)     # outside the lock: the machine stops the vCPUs

    def _queue_byte(self, value: int, status: int = 0) -> None:
        self._queue.append((value & 0xFF, status))

    def _command(self, cmd: int) -> str | None:
        self.pending = None
        if cmd in _TAKES_DATA:
            self.pending = cmd
        elif cmd == CMD_CTL_RCTR:
            self._queue_byte(self.ctr)
        elif cmd == CMD_AUX_DISABLE:
            self.ctr |= I8042_CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self.ctr &= ~I8042_CTR_AUXDIS
        elif cmd in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._queue_byte(RET_INTERFACE_OK)
        elif cmd == CMD_CTL_TEST:
            self.ctr |= I8042_CTR_SYS
            self._queue_byte(RET_CTL_TEST)
        elif cmd == CMD_KBD_DISABLE:
            self.ctr |= I8042_CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self.ctr &= ~I8042_CTR_KBDDIS
        elif cmd == CMD_READ_OUTPORT:
            self._queue_byte(self.outport)
        elif cmd >= CMD_PULSE_FIRST and not cmd & OUTPORT_RESET:
            return f"i8042 command {cmd:#04x} pulsed the CPU's reset line"
        return None

    def _data(self, value: int) -> str | None:
        cmd, self.pending = self.pending, None
        if cmd == CMD_CTL_WCTR:
            self.ctr = value
        elif cmd == CMD_WRITE_OUTPORT:
            self.outport = value
            if not value & OUTPORT_RESET:
                return f"i8042 output port written {value:#04x}: reset line low"
        elif cmd == CMD_KBD_LOOP:
            self._queue_byte(value)
        elif cmd == CMD_AUX_LOOP:
            self._queue_byte(value, I8042_STR_AUXDATA)
        elif cmd == CMD_AUX_SEND:
            self._queue_byte(RET_NO_DEVICE, I8042_STR_AUXDATA | I8042_STR_TIMEOUT)
        else:                           # a byte for the keyboard, which is not there
            self._queue_byte(RET_NO_DEVICE, I8042_STR_TIMEOUT)
        return None

    def _update(self) -> None:
        """Status from the head of the queue; IRQ 1 or 12 while a byte waits and the CTR
        enables its port's interrupt."""
        self.status &= ~(I8042_STR_OBF | I8042_STR_AUXDATA | I8042_STR_TIMEOUT
                         | I8042_STR_SYSFLAG)
        if self.ctr & I8042_CTR_SYS:
            self.status |= I8042_STR_SYSFLAG
        kbd = aux = 0
        if self._queue:
            bits = self._queue[0][1]
            self.status |= I8042_STR_OBF | bits
            if bits & I8042_STR_AUXDATA:
                aux = int(bool(self.ctr & I8042_CTR_AUXINT))
            else:
                kbd = int(bool(self.ctr & I8042_CTR_KBDINT))
        for line, level in ((KBD_IRQ, kbd), (AUX_IRQ, aux)):
            if self.levels[line] != level:
                self.levels[line] = level
                if self._irq is not None:
                    self._irq(line, level)

    def state(self) -> dict:
        with self._lock:
            return {"status": self.status, "ctr": self.ctr, "outport": self.outport,
                    "queued": bytes(b for b, _ in self._queue), "pending": self.pending,
                    "irq1": self.levels[KBD_IRQ], "irq12": self.levels[AUX_IRQ]}
