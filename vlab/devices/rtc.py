"""The CMOS RTC, a Motorola MC146818 as the PC has it at ports 0x70/0x71 (QEMU's
hw/rtc/mc146818rtc.c; Linux reads it with include/linux/mc146818rtc.h's names).

Port 0x70 selects a register (bit 7 masks NMIs on a PC: kept, not acted on); port 0x71
reads or writes it. Registers 0x00-0x09 are the time and date, 0x0A-0x0D the control
registers, the rest battery-backed RAM (0x32: the century, where QEMU and the ACPI FADT's
CENTURY field put it).

    0x00 seconds   0x01 seconds alarm   0x02 minutes   0x03 minutes alarm
    0x04 hours     0x05 hours alarm     0x06 day of week (1 = Sunday)
    0x07 day of month   0x08 month      0x09 year (two digits)
    0x0A register A: UIP (bit 7) | divider (bits 6-4, 010 = 32.768 kHz, running) | rate
    0x0B register B: SET | PIE | AIE | UIE | SQWE | DM (binary, else BCD) | 24/12 | DSE
    0x0C register C: IRQF | PF | AF | UF, read-only, cleared by reading
    0x0D register D: VRT (bit 7): the battery is good

Modelling choices:

- The clock is the host's (`clock()`, nanoseconds since the epoch, UTC) plus an offset the
  guest sets by writing the time: with SET in register B the time registers hold still and
  take writes; clearing SET starts the clock from what was written (a write without SET
  moves the clock at once, as QEMU's `rtc_set_time`).
- Values are BCD unless DM is set, hours 12-hour (bit 7 = PM) unless 24/12 is set, as the
  datasheet says; register B starts at 0x02 (24-hour, BCD: QEMU's and a PC BIOS's choice).
- Update in progress (register A's UIP) reads as set in the last 244 us of each second,
  when the chip would be copying the new time into the registers: the window in which
  Linux's `mc146818_get_time` waits before it reads.
- Register C's flags are worked out when the guest reads it: UF if a second boundary
  passed since the last read, PF if a periodic interval (register A's rate) did, AF if the
  time matched the alarm at any second in between (a byte 0xC0-0xFF there matches any).
  The device has no timer thread, so IRQ 8 is not driven: Linux's rtc-cmos reads the time
  at boot without interrupts.
"""
from __future__ import annotations

import calendar
import threading
import time
from typing import Callable

IOBASE, SIZE = 0x70, 2
CMOS_SIZE = 128

RTC_SECONDS, RTC_SECONDS_ALARM, RTC_MINUTES, RTC_MINUTES_ALARM = 0x00, 0x01, 0x02, 0x03
RTC_HOURS, RTC_HOURS_ALARM, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH = 0x04, 0x05, 0x06, 0x07
RTC_MONTH, RTC_YEAR = 0x08, 0x09
RTC_REG_A, RTC_REG_B, RTC_REG_C, RTC_REG_D = 0x0A, 0x0B, 0x0C, 0x0D
RTC_CENTURY = 0x32

RTC_UIP = 0x80
RTC_DIV_RUNNING = 0x20        # divider bits 010: the 32.768 kHz time base, counting
RTC_DIV_MASK = 0x70
RTC_RATE_MASK = 0x0F
RTC_SET, RTC_PIE, RTC_AIE, RTC_UIE = 0x80, 0x40, 0x20, 0x10
RTC_DM_BINARY, RTC_24H = 0x04, 0x02
RTC_IRQF, RTC_PF, RTC_AF, RTC_UF = 0x80, 0x40, 0x20, 0x10
RTC_VRT = 0x80
RTC_HOURS_PM = 0x80
ALARM_DONT_CARE = 0xC0

NS = 1_000_000_000
UIP_WINDOW_NS = 244_000       # the datasheet's update cycle: 244 us before the second ends
TIME_REGISTERS = (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH,
                  RTC_MONTH, RTC_YEAR, RTC_CENTURY)


def periodic_ns(reg_a: int) -> int | None:
    """Register A's periodic interval: rate 3-15 is 2**(rate-1) ticks of 32.768 kHz,
    rates 1 and 2 repeat 8 and 9 (the datasheet's table); 0 is off."""
    rate = reg_a & RTC_RATE_MASK
    if rate == 0:
        return None
    if rate < 3:
        rate += 7
    return (1 << (rate - 1)) * NS // 32768


class CmosRtc:
    """The MC146818 and its CMOS RAM behind the index port 0x70 and the data port 0x71."""

    IOBASE, SIZE = IOBASE, SIZE

    def __init__(self, clock: Callable[[], int] = time.time_ns, name: str = "rtc") -> None:
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self.cmos = bytearray(CMOS_SIZE)
        self.index = 0
        self.nmi_masked = False
        self.offset_ns = 0          # guest time minus host time
        self._last_c_read = clock()
        self.cmos[RTC_REG_A] = RTC_DIV_RUNNING | 0x06   # 1024 Hz, QEMU's reset value
        self.cmos[RTC_REG_B] = RTC_24H
        self.cmos[RTC_REG_D] = RTC_VRT

    # -- the guest's side -----------------------------------------------------------------

    def read(self, offset: int, size: int = 1) -> int:
        with self._lock:
            if offset == 0:
                return 0xFF     # the index port is write-only (QEMU reads 0xff)
            return self._read_register(self.index)

    def write(self, offset: int, value: int, size: int = 1) -> None:
        with self._lock:
            value &= 0xFF
            if offset == 0:
                self.index = value & 0x7F
                self.nmi_masked = bool(value & 0x80)
            else:
                self._write_register(self.index, value)

    def _now(self) -> int:
        return self._clock() + self.offset_ns

    def _read_register(self, reg: int) -> int:
        if reg in TIME_REGISTERS and not self.cmos[RTC_REG_B] & RTC_SET:
            self._latch(self._now())
        if reg == RTC_REG_A:
            return self.cmos[RTC_REG_A] | (RTC_UIP if self._updating() else 0)
        if reg == RTC_REG_C:
            return self._read_c()
        return self.cmos[reg]

    def _write_register(self, reg: int, value: int) -> None:
        if reg == RTC_REG_A:
            self.cmos[RTC_REG_A] = value & ~RTC_UIP
        elif reg == RTC_REG_B:
            old = self.cmos[RTC_REG_B]
            if value & RTC_SET and not old & RTC_SET:
                self._latch(self._now())        # the registers hold still from here
            self.cmos[RTC_REG_B] = value
            if old & RTC_SET and not value & RTC_SET:
                self._start_from_registers()
        elif reg in (RTC_REG_C, RTC_REG_D):
            return                              # read-only
        elif reg in TIME_REGISTERS:
            setting = self.cmos[RTC_REG_B] & RTC_SET
            if not setting:
                self._latch(self._now())
            self.cmos[reg] = value
            if not setting:
                self._start_from_registers()
        else:
            self.cmos[reg] = value

    def _updating(self) -> bool:
        running = self.cmos[RTC_REG_A] & RTC_DIV_MASK == RTC_DIV_RUNNING
        return (running and not self.cmos[RTC_REG_B] & RTC_SET
                and self._now() % NS >= NS - UIP_WINDOW_NS)

    # -- time <-> registers ----------------------------------------------------------------

    def _to_bcd(self, value: int) -> int:
        return value if self.cmos[RTC_REG_B] & RTC_DM_BINARY else (value // 10) << 4 | value % 10

    def _from_bcd(self, value: int) -> int:
        return value if self.cmos[RTC_REG_B] & RTC_DM_BINARY else (value >> 4) * 10 + (value & 0xF)

    def _encode_hour(self, hour: int) -> int:
        if self.cmos[RTC_REG_B] & RTC_24H:
            return self._to_bcd(hour)
        return self._to_bcd(hour % 12 or 12) | (RTC_HOURS_PM if hour >= 12 else 0)

    def _decode_hour(self, value: int) -> int:
        if self.cmos[RTC_REG_B] & RTC_24H:
            return self._from_bcd(value)
        return self._from_bcd(value & ~RTC_HOURS_PM) % 12 + (12 if value & RTC_HOURS_PM else 0)

    def _latch(self, now_ns: int) -> None:
        t = time.gmtime(now_ns // NS)
        cmos = self.cmos
        cmos[RTC_SECONDS] = self._to_bcd(t.tm_sec)
        cmos[RTC_MINUTES] = self._to_bcd(t.tm_min)
        cmos[RTC_HOURS] = self._encode_hour(t.tm_hour)
        cmos[RTC_DAY_OF_WEEK] = self._to_bcd((t.tm_wday + 1) % 7 + 1)   # tm: Monday is 0
        cmos[RTC_DAY_OF_MONTH] = self._to_bcd(t.tm_mday)
        cmos[RTC_MONTH] = self._to_bcd(t.tm_mon)
        cmos[RTC_YEAR] = self._to_bcd(t.tm_year % 100)
        cmos[RTC_CENTURY] = self._to_bcd(t.tm_year // 100)

    def _start_from_registers(self) -> None:
        """The clock runs on from the time in the registers, from the start of its second."""
        cmos = self.cmos
        year = self._from_bcd(cmos[RTC_CENTURY]) * 100 + self._from_bcd(cmos[RTC_YEAR])
        try:
            seconds = calendar.timegm((year, self._from_bcd(cmos[RTC_MONTH]),
                                       self._from_bcd(cmos[RTC_DAY_OF_MONTH]),
                                       self._decode_hour(cmos[RTC_HOURS]),
                                       self._from_bcd(cmos[RTC_MINUTES]),
                                       self._from_bcd(cmos[RTC_SECONDS])))
        except (ValueError, OverflowError):
            return      # a date the clock cannot hold: it keeps its time
        self.offset_ns = seconds * NS - self._clock()

    # -- register C ------------------------------------------------------------------------

    def _read_c(self) -> int:
        host = self._clock()
        then, now = self._last_c_read + self.offset_ns, host + self.offset_ns
        self._last_c_read = host
        flags = 0
        if now // NS > then // NS:
            flags |= RTC_UF
            if self._alarm_between(then // NS + 1, now // NS):
                flags |= RTC_AF
        period = periodic_ns(self.cmos[RTC_REG_A])
        if period is not None and now // period > then // period:
            flags |= RTC_PF
        enabled = self.cmos[RTC_REG_B] & (RTC_PIE | RTC_AIE | RTC_UIE)
        if flags & enabled:     # each enable bit sits where its flag does
            flags |= RTC_IRQF
        return flags

    def _alarm_between(self, first: int, last: int) -> bool:
        """Whether the alarm registers match any second from `first` to `last` (a day's
        seconds at most: after that every alarm time has come round)."""
        cmos = self.cmos
        alarm = [(cmos[RTC_SECONDS_ALARM], lambda t: self._to_bcd(t.tm_sec)),
                 (cmos[RTC_MINUTES_ALARM], lambda t: self._to_bcd(t.tm_min)),
                 (cmos[RTC_HOURS_ALARM], lambda t: self._encode_hour(t.tm_hour))]
        wanted = [(value, encode) for value, encode in alarm if value < ALARM_DONT_CARE]
        if not wanted:
            return True
        for second in range(max(first, last - 86400), last + 1):
            t = time.gmtime(second)
            if all(encode(t) == value for value, encode in wanted):
                return True
        return False

    def state(self) -> dict:
        """The index, the control registers and the guest's time (seconds since the epoch)."""
        with self._lock:
            return {"index": self.index, "nmi_masked": self.nmi_masked,
                    "reg_a": self.cmos[RTC_REG_A], "reg_b": self.cmos[RTC_REG_B],
                    "reg_d": self.cmos[RTC_REG_D], "time": self._now() // NS}
