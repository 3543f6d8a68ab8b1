"""The HPET, the PC's High Precision Event Timer, as QEMU's `pc` machine has it at 0xfed00000
(hw/timer/hpet.c; IA-PC HPET specification 1.0a).

A 64-bit main counter runs at a fixed rate while the general configuration's ENABLE bit is
set; each timer compares it with its comparator and interrupts when the counter gets there,
once or, with a period, again and again. Registers are 64 bits wide, reached with aligned
4- or 8-byte accesses (a 4-byte access at +4 is the upper half); other accesses read 0 and
are dropped.

    offset        register                         here (QEMU's values)
    0x000         general capabilities and ID      rev 1, 3 timers, 64-bit counter, legacy
                                                   route capable, vendor 0x8086, period
                                                   10,000,000 fs (100 MHz)
    0x010         general configuration            bit 0 ENABLE_CNF, bit 1 LEG_RT_CNF
    0x020         general interrupt status         a level-triggered timer's bit; write 1 to clear
    0x0f0         main counter                     writable only while halted
    0x100 + 0x20n timer n configuration and caps   periodic and 64-bit capable; may route to
                                                   IOAPIC input 2 only (QEMU's `pc`)
    0x108 + 0x20n timer n comparator
    0x110 + 0x20n timer n FSB route                kept, unused: no FSB (MSI) delivery

Interrupts: a timer fires when ENABLE_CNF and its Tn_INT_ENB_CNF are set. With LEG_RT_CNF,
timer 0 drives GSI 0 (the 8259's IRQ 0; KVM's default routing takes GSI 0 to IOAPIC
input 2) and timer 1 GSI 8 (the RTC's IRQ 8), as QEMU's `hpet_update_irq` routes them;
otherwise a timer drives the GSI of its Tn_INT_ROUTE_CNF. Edge-triggered timers pulse the
line; level-triggered ones raise it and set their status bit until the guest clears it.
`irq(gsi, level)` is the line, injected: KVM_IRQ_LINE on a VM with the in-kernel irqchip.
Unlike QEMU, setting LEG_RT_CNF does not silence the i8254 PIT (KVM's in-kernel PIT has its
own HPET-legacy flag); a guest using both on IRQ 0 gets both.

The device has no thread: `clock()` (nanoseconds) gives the time, `deadline()` says when
the next interrupt is due and `service()` delivers those due. `HpetTicker` is the thread
that calls them on time.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

BASE = 0xFED00000
SIZE = 0x400
NUM_TIMERS = 3              # QEMU's default (HPET_MIN_TIMERS)
PERIOD_FS = 10_000_000      # femtoseconds per tick: 10 ns, QEMU's HPET_CLK_PERIOD
TICK_NS = PERIOD_FS // 1_000_000
VENDOR_ID = 0x8086

HPET_ID = 0x000
HPET_CFG = 0x010
HPET_STATUS = 0x020
HPET_COUNTER = 0x0F0
HPET_TIMER0 = 0x100
TIMER_STRIDE = 0x20
TN_CFG, TN_CMP, TN_FSB = 0x00, 0x08, 0x10

CFG_ENABLE = 1 << 0
CFG_LEGACY = 1 << 1

ID_REV = 0x01
ID_COUNT_SIZE_64 = 1 << 13
ID_LEGACY_CAPABLE = 1 << 15
CAPABILITIES = (ID_REV | (NUM_TIMERS - 1) << 8 | ID_COUNT_SIZE_64 | ID_LEGACY_CAPABLE
                | VENDOR_ID << 16 | PERIOD_FS << 32)

TN_LEVEL = 1 << 1           # Tn_INT_TYPE_CNF: level-triggered
TN_INT_ENABLE = 1 << 2      # Tn_INT_ENB_CNF
TN_PERIODIC = 1 << 3        # Tn_TYPE_CNF
TN_PERIODIC_CAP = 1 << 4    # Tn_PER_INT_CAP (read-only)
TN_SIZE_64_CAP = 1 << 5     # Tn_SIZE_CAP (read-only)
TN_SETVAL = 1 << 6          # Tn_VAL_SET_CNF: the next comparator write sets it in periodic mode
TN_32BIT = 1 << 8           # Tn_32MODE_CNF
TN_ROUTE_SHIFT = 9          # Tn_INT_ROUTE_CNF, bits 13:9
TN_ROUTE_MASK = 0x1F << TN_ROUTE_SHIFT
TN_WRITABLE = 0x7F4E        # QEMU's HPET_TN_CFG_WRITE_MASK
ROUTE_CAP = 1 << 2          # QEMU's `pc` (i440FX): IOAPIC input 2 only
TIMER_CAPS = TN_PERIODIC_CAP | TN_SIZE_64_CAP | ROUTE_CAP << 32

MAX_WAIT = 1.0              # seconds the ticker sleeps at most (a deadline may be centuries off)
LEGACY_GSI = (0, 8)         # timers 0 and 1 with LEG_RT_CNF: IRQ 0 and the RTC's IRQ 8
MASK64 = (1 << 64) - 1


@dataclass
class HpetTimer:
    config: int = TIMER_CAPS
    comparator: int = MASK64
    period: int = 0
    fsb: int = 0
    armed: bool = False     # an interrupt is due when the counter reaches the comparator

    @property
    def width_mask(self) -> int:
        return 0xFFFFFFFF if self.config & TN_32BIT else MASK64

    def ticks_left(self, count: int) -> int:
        """Ticks until the counter reaches the comparator, as a signed difference in the
        timer's width (QEMU's hpet_calculate_diff): 0 or less, it is due now, so a
        comparator the counter has just passed fires at once instead of after a wrap."""
        mask = self.width_mask
        diff = (self.comparator - count) & mask
        return diff - (mask + 1) if diff > mask >> 1 else diff


class Hpet:
    """The HPET's registers, counter and timers; `irq(gsi, level)` drives the lines."""

    def __init__(self, irq: Callable[[int, int], None] | None = None,
                 clock: Callable[[], int] = time.monotonic_ns, name: str = "hpet") -> None:
        self.name = name
        self._irq = irq
        self._clock = clock
        self._lock = threading.RLock()
        self.on_change: Callable[[], None] | None = None  # a timer was (re)programmed
        self.reset()

    def reset(self) -> None:
        """The power-on state (QEMU's hpet_reset): halted at 0, every timer off."""
        with self._lock:
            self.config = 0
            self.status = 0
            self._counter = 0           # the counter's value when last halted or enabled
            self._since = 0             # clock() at enable
            self.timers = [HpetTimer() for _ in range(NUM_TIMERS)]
            self.fired = [0] * NUM_TIMERS  # interrupts delivered, per timer

    # -- time --------------------------------------------------------------------------
    def counter(self, now: int | None = None) -> int:
        """The main counter: frozen while halted, one tick per 10 ns while enabled."""
        with self._lock:
            if not self.config & CFG_ENABLE:
                return self._counter
            now = self._clock() if now is None else now
            return (self._counter + (now - self._since) // TICK_NS) & MASK64

    def deadline(self) -> int | None:
        """clock() time of the next interrupt due, or None."""
        with self._lock:
            if not self.config & CFG_ENABLE:
                return None
            now = self._clock()
            count = self.counter(now)
            due = [now + max(t.ticks_left(count), 0) * TICK_NS
                   for t in self.timers if t.armed and t.config & TN_INT_ENABLE]
            return min(due, default=None)

    def service(self) -> int:
        """Deliver every interrupt due by now; returns how many."""
        delivered = 0
        with self._lock:
            if not self.config & CFG_ENABLE:
                return 0
            count = self.counter()
            for n, timer in enumerate(self.timers):
                if not (timer.armed and timer.config & TN_INT_ENABLE):
                    continue
                left = timer.ticks_left(count)
                if left > 0:
                    continue
                if timer.config & TN_PERIODIC and timer.period:
                    # the next multiple of the period ahead (periods missed are not owed)
                    ahead = (-left // timer.period + 1) * timer.period
                    timer.comparator = (timer.comparator + ahead) & timer.width_mask
                else:
                    timer.armed = False
                self._update_irq(n, True)
                self.fired[n] += 1
                delivered += 1
        return delivered

    # -- the guest's side --------------------------------------------------------------
    def read(self, offset: int, size: int = 4) -> int:
        if size not in (4, 8) or offset % size:
            return 0
        with self._lock:
            value = self._register(offset & ~7)
        return value >> 32 if offset & 4 else value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        if size not in (4, 8) or offset % size:
            return
        with self._lock:
            register = offset & ~7
            old = self._register(register)
            if size == 4:
                shift = 32 if offset & 4 else 0
                value = old & ~(0xFFFFFFFF << shift) | (value & 0xFFFFFFFF) << shift
            self._set_register(register, value & MASK64, old)
        if self.on_change is not None:
            self.on_change()

    def _register(self, register: int) -> int:
        if register == HPET_ID:
            return CAPABILITIES
        if register == HPET_CFG:
            return self.config
        if register == HPET_STATUS:
            return self.status
        if register == HPET_COUNTER:
            return self.counter()
        timer, field = self._timer_field(register)
        if timer is None:
            return 0
        return {TN_CFG: timer.config, TN_CMP: timer.comparator, TN_FSB: timer.fsb}[field]

    def _set_register(self, register: int, value: int, old: int) -> None:
        if register == HPET_CFG:
            self._write_config(value & (CFG_ENABLE | CFG_LEGACY))
        elif register == HPET_STATUS:
            for n in range(NUM_TIMERS):
                if value & self.status & 1 << n:
                    self._update_irq(n, False)
        elif register == HPET_COUNTER:
            if not self.config & CFG_ENABLE:  # the spec: write only while halted
                self._counter = value
                for timer in self.timers:
                    timer.armed = True
        else:
            timer, field = self._timer_field(register)
            if timer is None:
                return
            n = self.timers.index(timer)
            if field == TN_CFG:
                self._write_timer_config(n, timer, value)
            elif field == TN_CMP:
                value &= timer.width_mask
                if not timer.config & TN_PERIODIC or timer.config & TN_SETVAL:
                    timer.comparator = value
                timer.period = value
                timer.config &= ~TN_SETVAL
                timer.armed = True
            else:
                timer.fsb = value

    def _write_config(self, value: int) -> None:
        was = self.config
        if (value ^ was) & CFG_ENABLE:
            now = self._clock()
            if value & CFG_ENABLE:
                self._since = now
                self.config |= CFG_ENABLE
                for timer in self.timers:
                    timer.armed = True
            else:
                self._counter = self.counter(now)
        if (value ^ was) & CFG_LEGACY:  # the lines move: lower the old ones
            for n in range(min(2, NUM_TIMERS)):
                self._update_irq(n, False)
        self.config = value

    def _write_timer_config(self, n: int, timer: HpetTimer, value: int) -> None:
        route = (value & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT
        if not ROUTE_CAP >> route & 1:  # a route the timer cannot take keeps the old one
            value = value & ~TN_ROUTE_MASK | timer.config & TN_ROUTE_MASK
        was = timer.config
        timer.config = was & ~TN_WRITABLE | value & TN_WRITABLE
        if timer.config & TN_32BIT:
            timer.comparator &= 0xFFFFFFFF
            timer.period &= 0xFFFFFFFF
        if was & TN_LEVEL and not timer.config & TN_LEVEL or not timer.config & TN_INT_ENABLE:
            self._update_irq(n, False)
        if timer.config & TN_INT_ENABLE and not was & TN_INT_ENABLE:
            timer.armed = True

    def _timer_field(self, register: int) -> tuple[HpetTimer | None, int]:
        n, field = divmod(register - HPET_TIMER0, TIMER_STRIDE)
        if register < HPET_TIMER0 or n >= NUM_TIMERS or field > TN_FSB:
            return None, 0
        return self.timers[n], field

    # -- the interrupt lines -----------------------------------------------------------
    def gsi(self, n: int) -> int:
        """The GSI timer `n` drives (QEMU's hpet_update_irq routing)."""
        if self.config & CFG_LEGACY and n < len(LEGACY_GSI):
            return LEGACY_GSI[n]
        return (self.timers[n].config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT

    def _update_irq(self, n: int, fire: bool) -> None:
        timer, bit = self.timers[n], 1 << n
        line = self.gsi(n)
        active = fire and timer.config & TN_INT_ENABLE and self.config & CFG_ENABLE
        if not active:
            if self.status & bit:
                self.status &= ~bit
                self._set_line(line, 0)
        elif timer.config & TN_LEVEL:
            self.status |= bit
            self._set_line(line, 1)
        else:
            self.status &= ~bit
            self._set_line(line, 1)
            self._set_line(line, 0)

    def _set_line(self, gsi: int, level: int) -> None:
        if self._irq is not None:
            self._irq(gsi, level)

    def state(self) -> dict:
        with self._lock:
            return {"config": self.config, "status": self.status, "counter": self.counter(),
                    "timers": [{"config": t.config, "comparator": t.comparator,
                                "period": t.period, "armed": t.armed} for t in self.timers],
                    "fired": list(self.fired)}


class HpetTicker(threading.Thread):
    """Calls `hpet.service()` when `hpet.deadline()` comes, and re-reads the deadline
    whenever the guest reprograms the device: QEMU's timer callbacks, as a thread."""

    def __init__(self, hpet: Hpet, clock: Callable[[], int] = time.monotonic_ns):
        super().__init__(name="hpet", daemon=True)
        self.hpet = hpet
        self._clock = clock
        self._wake = threading.Event()
        self._stopped = False
        hpet.on_change = self._wake.set

    def run(self) -> None:
        while not self._stopped:
            due = self.hpet.deadline()
            wait = None if due is None else min(max(due - self._clock(), 0) / 1e9, MAX_WAIT)
            if due is not None and wait == 0:
                self.hpet.service()
                continue
            self._wake.wait(wait)
            self._wake.clear()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self.join()
