"""The HPET register by register, on a clock the test moves by hand."""
import pytest

from vlab.devices.hpet import (CAPABILITIES, CFG_ENABLE, CFG_LEGACY, HPET_CFG, HPET_COUNTER,
                               HPET_ID, HPET_STATUS, HPET_TIMER0, TN_32BIT, TN_INT_ENABLE,
                               TN_LEVEL, TN_PERIODIC, TN_SETVAL, Hpet)

T0_CFG, T0_CMP = HPET_TIMER0, HPET_TIMER0 + 8
T1_CFG, T1_CMP = HPET_TIMER0 + 0x20, HPET_TIMER0 + 0x28
T2_CFG = HPET_TIMER0 + 0x40


class Clock:
    def __init__(self):
        self.ns = 1_000_000

    def __call__(self):
        return self.ns


@pytest.fixture
def hpet():
    clock = Clock()
    lines = []
    dev = Hpet(irq=lambda gsi, level: lines.append((gsi, level)), clock=clock)
    dev.clock, dev.lines = clock, lines
    return dev


def test_capabilities_are_qemus():
    """Rev 1, 3 timers (field 2), 64-bit counter, legacy-route capable, vendor 8086, and
    a period of 10,000,000 fs: QEMU's 0x009896808086a201."""
    dev = Hpet()
    assert CAPABILITIES == 0x009896808086A201
    assert dev.read(HPET_ID, 8) == CAPABILITIES
    assert (dev.read(HPET_ID, 4), dev.read(HPET_ID + 4, 4)) == (0x8086A201, 0x00989680)
    dev.write(HPET_ID, 0, 8)
    assert dev.read(HPET_ID, 8) == CAPABILITIES  # read-only


def test_counter_stands_still_until_enabled_then_ticks_every_10_ns(hpet):
    hpet.clock.ns += 5000
    assert hpet.read(HPET_COUNTER, 8) == 0
    hpet.write(HPET_CFG, CFG_ENABLE, 4)
    hpet.clock.ns += 1000
    assert hpet.read(HPET_COUNTER, 8) == 100
    assert hpet.read(HPET_COUNTER, 4) == 100 and hpet.read(HPET_COUNTER + 4, 4) == 0
    hpet.write(HPET_CFG, 0, 4)  # halted: frozen
    hpet.clock.ns += 1000
    assert hpet.read(HPET_COUNTER, 8) == 100


def test_counter_is_writable_only_while_halted(hpet):
    hpet.write(HPET_COUNTER, 0x1_0000_0000, 8)
    assert hpet.read(HPET_COUNTER, 8) == 0x1_0000_0000
    hpet.write(HPET_COUNTER, 7, 4)  # the low half only
    assert hpet.read(HPET_COUNTER, 8) == 0x1_0000_0007
    hpet.write(HPET_CFG, CFG_ENABLE, 4)
    hpet.write(HPET_COUNTER, 0, 8)
    assert hpet.read(HPET_COUNTER, 8) == 0x1_0000_0007


@pytest.mark.parametrize("offset, size", [(HPET_ID, 1), (HPET_ID, 2), (HPET_ID + 2, 4),
                                          (HPET_ID + 4, 8)])
def test_narrow_or_misaligned_accesses_read_zero_and_are_dropped(hpet, offset, size):
    assert hpet.read(offset, size) == 0
    hpet.write(HPET_CFG + (offset - HPET_ID), CFG_ENABLE, size)
    assert hpet.read(HPET_CFG, 4) == 0


def test_timer_config_keeps_read_only_bits_and_the_only_route_qemu_offers(hpet):
    caps = hpet.read(T0_CFG, 8)
    assert caps == (0x4 << 32) | 0x30  # route capability: IOAPIC input 2; periodic, 64-bit
    hpet.write(T0_CFG, 0xFFFF_FFFF_FFFF_FFFF, 8)
    value = hpet.read(T0_CFG, 8)
    assert value >> 32 == 0x4 and value & 0x30 == 0x30
    assert value & 0x3E00 == 0  # route 31 is not offered: the route stays 0
    hpet.write(T0_CFG, 2 << 9, 4)
    assert hpet.read(T0_CFG, 4) & 0x3E00 == 2 << 9


def test_one_shot_edge_interrupt_in_legacy_mode_pulses_irq0_once(hpet):
    hpet.write(T0_CMP, 1000, 8)
    hpet.write(T0_CFG, TN_INT_ENABLE, 4)
    hpet.write(HPET_CFG, CFG_ENABLE | CFG_LEGACY, 4)
    assert hpet.deadline() == hpet.clock.ns + 1000 * 10
    hpet.clock.ns += 9990
    assert hpet.service() == 0 and hpet.lines == []
    hpet.clock.ns += 10
    assert hpet.service() == 1
    assert hpet.lines == [(0, 1), (0, 0)] and hpet.read(HPET_STATUS, 4) == 0
    hpet.clock.ns += 10**9
    assert hpet.service() == 0 and hpet.deadline() is None  # one shot: fired


def test_periodic_timer_sets_comparator_and_period_then_steps(hpet):
    hpet.write(T1_CFG, TN_INT_ENABLE | TN_PERIODIC | TN_SETVAL, 4)
    hpet.write(T1_CMP, 500, 8)
    assert hpet.read(T1_CFG, 4) & TN_SETVAL == 0  # VAL_SET clears itself
    hpet.write(HPET_CFG, CFG_ENABLE | CFG_LEGACY, 4)
    for tick in range(1, 4):
        hpet.clock.ns += 5000
        assert hpet.service() == 1
        assert hpet.read(T1_CMP, 8) == 500 * (tick + 1)
    assert hpet.lines == [(8, 1), (8, 0)] * 3  # timer 1, legacy: the RTC's IRQ 8
    hpet.clock.ns += 5000 * 10  # ten periods late: one interrupt, the comparator catches up
    assert hpet.service() == 1 and hpet.read(T1_CMP, 8) == 500 * 14  # counter at 6500


def test_level_interrupt_holds_the_line_until_status_is_cleared(hpet):
    hpet.write(T2_CFG, TN_INT_ENABLE | TN_LEVEL | 2 << 9, 4)  # routed to GSI 2
    hpet.write(HPET_TIMER0 + 0x48, 10, 8)
    hpet.write(HPET_CFG, CFG_ENABLE, 4)
    hpet.clock.ns += 100
    assert hpet.service() == 1
    assert hpet.lines == [(2, 1)] and hpet.read(HPET_STATUS, 4) == 1 << 2
    hpet.write(HPET_STATUS, 1 << 0, 4)  # another timer's bit: nothing
    assert hpet.read(HPET_STATUS, 4) == 1 << 2
    hpet.write(HPET_STATUS, 1 << 2, 4)
    assert hpet.lines == [(2, 1), (2, 0)] and hpet.read(HPET_STATUS, 4) == 0


def test_no_interrupt_without_enable_bits(hpet):
    hpet.write(T0_CMP, 10, 8)
    hpet.write(HPET_CFG, CFG_ENABLE, 4)  # Tn_INT_ENB_CNF clear
    hpet.clock.ns += 1000
    assert hpet.service() == 0 and hpet.deadline() is None
    hpet.write(HPET_CFG, 0, 4)
    hpet.write(T0_CFG, TN_INT_ENABLE, 4)  # counter halted
    assert hpet.service() == 0 and hpet.deadline() is None and hpet.lines == []


def test_32bit_mode_truncates_the_comparator_and_wraps(hpet):
    hpet.write(T0_CFG, TN_INT_ENABLE | TN_32BIT, 4)
    hpet.write(T0_CMP, 0x1_0000_0010, 8)
    assert hpet.read(T0_CMP, 8) == 0x10
    hpet.write(HPET_COUNTER, 0xFFFF_FFF0, 8)
    hpet.write(HPET_CFG, CFG_ENABLE, 4)
    assert hpet.deadline() == hpet.clock.ns + 0x20 * 10  # through the 32-bit wrap
    hpet.clock.ns += 0x20 * 10
    assert hpet.service() == 1


def test_state_reports_the_timers(hpet):
    hpet.write(T0_CMP, 5, 8)
    state = hpet.state()
    assert state["timers"][0]["comparator"] == 5 and state["fired"] == [0, 0, 0]


def test_a_comparator_the_counter_has_passed_fires_at_once(hpet):
    """QEMU compares by signed difference (hpet_calculate_diff): a comparator written just
    behind the running counter is due now, not after the counter wraps."""
    hpet.write(T0_CFG, TN_INT_ENABLE | TN_32BIT, 4)
    hpet.write(HPET_CFG, CFG_ENABLE, 4)
    hpet.clock.ns += 10_000  # counter 1000
    assert hpet.service() == 1  # the reset comparator 0xffffffff is "just behind" it
    hpet.write(T0_CMP, 900, 4)
    assert hpet.deadline() == hpet.clock.ns and hpet.service() == 1
    hpet.write(T0_CMP, 1100, 4)
    assert hpet.deadline() == hpet.clock.ns + 100 * 10
