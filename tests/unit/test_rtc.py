"""The CMOS RTC register by register, on a clock the test moves."""
import calendar

from vlab.devices.rtc import (RTC_24H, RTC_DM_BINARY, RTC_HOURS, RTC_IRQF, RTC_MINUTES,
                              RTC_PF, RTC_PIE, RTC_REG_A, RTC_REG_B, RTC_REG_C, RTC_REG_D,
                              RTC_SECONDS, RTC_SECONDS_ALARM, RTC_SET, RTC_UF, RTC_UIE,
                              RTC_AF, RTC_UIP, RTC_VRT, CmosRtc)

NS = 1_000_000_000
# Tuesday 2026-12-01 21:07:05 UTC
EPOCH = calendar.timegm((2026, 12, 1, 21, 7, 5))


class Clock:
    def __init__(self, seconds=EPOCH):
        self.ns = seconds * NS

    def __call__(self):
        return self.ns


def make(seconds=EPOCH):
    clock = Clock(seconds)
    return CmosRtc(clock=clock), clock


def reg(rtc, index):
    rtc.write(0, index)
    return rtc.read(1)


def put(rtc, index, value):
    rtc.write(0, index)
    rtc.write(1, value)


def test_time_reads_as_bcd_24_hour_from_the_clock():
    rtc, _ = make()
    assert [reg(rtc, r) for r in range(0x0A)] == [
        0x05, 0, 0x07, 0, 0x21, 0, 0x03, 0x01, 0x12, 0x26]   # Tuesday: 3 (Sunday is 1)
    assert reg(rtc, 0x32) == 0x20                              # the century
    assert reg(rtc, RTC_REG_B) == RTC_24H and reg(rtc, RTC_REG_D) == RTC_VRT


def test_binary_and_12_hour_modes():
    rtc, _ = make()
    put(rtc, RTC_REG_B, RTC_DM_BINARY)          # binary, 12-hour
    assert reg(rtc, RTC_SECONDS) == 5 and reg(rtc, RTC_HOURS) == 0x80 | 9   # 9 PM
    put(rtc, RTC_REG_B, 0)                      # BCD, 12-hour
    assert reg(rtc, RTC_HOURS) == 0x80 | 0x09


def test_the_clock_runs_and_uip_marks_the_last_244_us_of_a_second():
    rtc, clock = make()
    assert not reg(rtc, RTC_REG_A) & RTC_UIP
    clock.ns += NS - 200_000
    assert reg(rtc, RTC_REG_A) & RTC_UIP
    clock.ns += 200_000
    assert not reg(rtc, RTC_REG_A) & RTC_UIP and reg(rtc, RTC_SECONDS) == 0x06


def test_setting_the_time_holds_the_registers_then_runs_from_them():
    rtc, clock = make()
    put(rtc, RTC_REG_B, RTC_24H | RTC_SET)
    put(rtc, RTC_HOURS, 0x08)
    put(rtc, RTC_MINUTES, 0x30)
    put(rtc, RTC_SECONDS, 0x00)
    clock.ns += 5 * NS
    assert reg(rtc, RTC_SECONDS) == 0x00        # held while SET
    assert not reg(rtc, RTC_REG_A) & RTC_UIP
    put(rtc, RTC_REG_B, RTC_24H)
    clock.ns += 3 * NS
    assert (reg(rtc, RTC_HOURS), reg(rtc, RTC_MINUTES), reg(rtc, RTC_SECONDS)) == (0x08, 0x30, 0x03)
    assert rtc.state()["time"] == calendar.timegm((2026, 12, 1, 8, 30, 3))


def test_a_write_without_set_moves_the_clock_at_once():
    rtc, _ = make()
    put(rtc, RTC_MINUTES, 0x59)
    assert reg(rtc, RTC_MINUTES) == 0x59 and reg(rtc, RTC_HOURS) == 0x21


def test_register_c_flags_since_its_last_read_and_irqf_when_enabled():
    rtc, clock = make()
    reg(rtc, RTC_REG_C)
    clock.ns += NS // 2
    assert reg(rtc, RTC_REG_C) == RTC_PF        # 1024 Hz periodic; no second boundary
    assert reg(rtc, RTC_REG_C) == 0             # reading clears
    clock.ns += NS
    assert reg(rtc, RTC_REG_C) == RTC_UF | RTC_PF
    put(rtc, RTC_REG_B, RTC_24H | RTC_UIE)
    clock.ns += NS
    assert reg(rtc, RTC_REG_C) == RTC_IRQF | RTC_UF | RTC_PF
    put(rtc, RTC_REG_A, 0x20)                   # rate 0: no periodic flag
    put(rtc, RTC_REG_B, RTC_24H | RTC_PIE)
    clock.ns += NS
    assert reg(rtc, RTC_REG_C) == RTC_UF        # PIE set but PF not raised: no IRQF


def test_the_alarm_flag_when_a_second_in_between_matched():
    rtc, clock = make()
    reg(rtc, RTC_REG_C)
    put(rtc, RTC_SECONDS_ALARM, 0x10)
    put(rtc, 0x03, 0xC0)                        # minutes: any
    put(rtc, 0x05, 0xC0)                        # hours: any
    clock.ns += 4 * NS                          # to 21:07:09
    assert not reg(rtc, RTC_REG_C) & RTC_AF
    clock.ns += 2 * NS                          # through 21:07:10
    assert reg(rtc, RTC_REG_C) & RTC_AF


def test_the_index_port_masks_nmi_and_reads_ff():
    rtc, _ = make()
    rtc.write(0, 0x80 | RTC_REG_D)
    assert rtc.read(0) == 0xFF and rtc.read(1) == RTC_VRT
    assert rtc.state()["nmi_masked"]
    put(rtc, 0x40, 0xAB)                        # battery-backed RAM keeps what is written
    assert reg(rtc, 0x40) == 0xAB
    put(rtc, RTC_REG_D, 0)                      # read-only
    assert reg(rtc, RTC_REG_D) == RTC_VRT
