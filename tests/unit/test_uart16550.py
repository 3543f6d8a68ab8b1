"""The 16550A register by register, with no VM: what a guest driver would see."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from vlab.devices import Uart16550
from vlab.devices.uart16550 import (
    FIFO_SIZE, UART_DLL, UART_DLM, UART_FCR, UART_IER, UART_IER_MSI, UART_IER_RDI,
    UART_IER_RLSI, UART_IER_THRI, UART_IIR, UART_IIR_CTI, UART_IIR_MSI, UART_IIR_NO_INT,
    UART_IIR_RDI, UART_IIR_RLSI, UART_IIR_THRI, UART_LCR, UART_LCR_DLAB, UART_LSR,
    UART_LSR_DR, UART_LSR_OE, UART_LSR_TEMT, UART_LSR_THRE, UART_MCR, UART_MCR_DTR,
    UART_MCR_LOOP, UART_MCR_OUT1, UART_MCR_OUT2, UART_MCR_RTS, UART_MSR, UART_MSR_CTS,
    UART_MSR_DCD, UART_MSR_DDSR, UART_MSR_DSR, UART_MSR_RI, UART_MSR_TERI, UART_RX,
    UART_SCR, UART_TX,
)


class Wire:
    """Collects what the UART sends and every change of its interrupt line."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.irq: list[bool] = []

    def uart(self) -> Uart16550:
        return Uart16550(output=self.sent.extend, irq=self.irq.append)


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def uart(wire) -> Uart16550:
    return wire.uart()


def enable_fifo(uart: Uart16550, trigger_bits: int = 0x00) -> None:
    uart.write(UART_FCR, 0x01 | trigger_bits)


# -- power-on state and plain registers -----------------------------------------------------

def test_reset_values_match_qemu(uart):
    s = uart.state()
    assert s["lsr"] == UART_LSR_THRE | UART_LSR_TEMT
    assert s["iir"] == UART_IIR_NO_INT
    assert s["msr"] == UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
    assert s["mcr"] == UART_MCR_OUT2
    assert (s["dll"], s["dlm"]) == (0x0C, 0)  # 115200 / 12 = 9600 baud
    assert (s["ier"], s["lcr"], s["fcr"], s["scr"]) == (0, 0, 0, 0)
    assert s["irq"] is False


def test_state_names_every_register_and_has_no_side_effects(uart):
    uart.write(UART_IER, UART_IER_THRI)
    first = uart.state()
    assert set(first) >= {"rbr", "thr", "ier", "iir", "fcr", "lcr", "mcr", "lsr", "msr",
                          "scr", "dll", "dlm"}
    assert uart.state() == first  # reading IIR would have acknowledged THRE
    assert first["iir"] == UART_IIR_THRI


def test_thr_write_goes_out_at_once_and_thr_stays_empty(uart, wire):
    for ch in b"Hi\n":
        uart.write(UART_TX, ch)
        assert uart.read(UART_LSR) & (UART_LSR_THRE | UART_LSR_TEMT) == 0x60
    assert bytes(wire.sent) == b"Hi\n"
    assert uart.state()["thr"] == ord("\n")


def test_scratch_and_line_control_hold_their_value(uart):
    uart.write(UART_SCR, 0x5A)
    uart.write(UART_LCR, 0x1B)  # 8 bits, 2 stop, even parity
    assert uart.read(UART_SCR) == 0x5A
    assert uart.read(UART_LCR) == 0x1B


def test_ier_keeps_four_bits_and_mcr_five(uart):
    uart.write(UART_IER, 0xFF)
    uart.write(UART_MCR, 0xEF)
    assert uart.read(UART_IER) == 0x0F
    assert uart.read(UART_MCR) == 0x0F


def test_lsr_and_msr_ignore_writes(uart):
    uart.write(UART_LSR, 0x00)
    uart.write(UART_MSR, 0x00)
    assert uart.read(UART_LSR) == 0x60
    assert uart.read(UART_MSR) == 0xB0


# -- divisor latch --------------------------------------------------------------------------

def test_dlab_maps_offsets_0_and_1_to_the_divisor(uart, wire):
    uart.write(UART_IER, UART_IER_RDI)
    uart.write(UART_LCR, UART_LCR_DLAB | 0x03)
    uart.write(UART_DLL, 0x01)  # 115200 baud
    uart.write(UART_DLM, 0x00)
    assert (uart.read(UART_DLL), uart.read(UART_DLM)) == (0x01, 0x00)
    assert wire.sent == b""  # not transmitted
    uart.write(UART_LCR, 0x03)
    assert uart.read(UART_IER) == UART_IER_RDI  # IER untouched
    assert (uart.state()["dll"], uart.state()["dlm"]) == (0x01, 0x00)
    uart.write(UART_TX, ord("x"))
    assert wire.sent == b"x"


def test_dlab_hides_the_receive_buffer(uart):
    uart.feed(b"k")
    uart.write(UART_LCR, UART_LCR_DLAB)
    assert uart.read(UART_RX) == 0x0C
    assert uart.read(UART_LSR) & UART_LSR_DR  # still waiting
    uart.write(UART_LCR, 0)
    assert uart.read(UART_RX) == ord("k")


def test_wide_access_is_split_into_consecutive_registers(uart):
    uart.write(UART_LCR, UART_LCR_DLAB)
    uart.write(UART_DLL, 0x0180, size=2)
    assert (uart.read(UART_DLL), uart.read(UART_DLM)) == (0x80, 0x01)
    assert uart.read(UART_DLL, size=2) == 0x0180
    assert uart.read(UART_LCR, size=4) == 0xB0_60_08_80  # MSR, LSR, MCR, LCR


# -- receiver -------------------------------------------------------------------------------

def test_receive_without_fifo(uart):
    assert uart.read(UART_LSR) & UART_LSR_DR == 0
    assert uart.feed(b"a") == 1
    assert uart.read(UART_LSR) & UART_LSR_DR
    assert uart.read(UART_RX) == ord("a")
    assert uart.read(UART_LSR) & UART_LSR_DR == 0


def test_overrun_without_fifo_replaces_the_byte_and_sets_oe_once(uart):
    assert uart.feed(b"ab") == 1
    lsr = uart.read(UART_LSR)
    assert lsr & (UART_LSR_OE | UART_LSR_DR) == UART_LSR_OE | UART_LSR_DR
    assert uart.read(UART_LSR) & UART_LSR_OE == 0  # reading LSR cleared it
    assert uart.read(UART_RX) == ord("b")


def test_fifo_holds_sixteen_bytes_in_order_then_overruns(uart):
    enable_fifo(uart)
    assert uart.state()["iir"] & 0xC0 == 0xC0
    assert uart.can_receive() == FIFO_SIZE
    data = bytes(range(0x41, 0x41 + 20))
    assert uart.feed(data) == FIFO_SIZE
    assert uart.can_receive() == 0
    assert uart.read(UART_LSR) & UART_LSR_OE
    got = bytearray()
    while uart.read(UART_LSR) & UART_LSR_DR:
        got.append(uart.read(UART_RX))
    assert bytes(got) == data[:FIFO_SIZE]  # the overrunning bytes were lost, not the old
    assert uart.can_receive() == FIFO_SIZE


def test_fcr_clear_receiver_empties_the_fifo(uart):
    enable_fifo(uart)
    uart.feed(b"junk")
    uart.write(UART_FCR, 0x01 | 0x02)
    assert uart.read(UART_LSR) & UART_LSR_DR == 0
    assert uart.state()["rx_fifo"] == b""
    assert uart.state()["fcr"] == 0x01  # the clear bit does not stick


def test_switching_fifos_off_flushes_them(uart):
    enable_fifo(uart)
    uart.feed(b"abc")
    uart.write(UART_FCR, 0x00)
    assert uart.read(UART_LSR) & UART_LSR_DR == 0
    assert uart.state()["iir"] & 0xC0 == 0
    assert uart.can_receive() == 1


@given(st.binary(max_size=40))
def test_fifo_keeps_the_first_sixteen_bytes(data):
    uart = Uart16550()
    enable_fifo(uart)
    uart.feed(data)
    lsr = uart.read(UART_LSR)
    assert bool(lsr & UART_LSR_OE) == (len(data) > FIFO_SIZE)
    got = bytearray()
    while uart.read(UART_LSR) & UART_LSR_DR:
        got.append(uart.read(UART_RX))
    assert bytes(got) == data[:FIFO_SIZE]


# -- interrupts -----------------------------------------------------------------------------

def test_thr_empty_interrupt_and_its_acknowledgement(uart, wire):
    uart.write(UART_IER, UART_IER_THRI)
    assert wire.irq == [True]
    assert uart.read(UART_IIR) == UART_IIR_THRI
    assert wire.irq == [True, False]  # reading IIR acknowledged it
    assert uart.read(UART_IIR) == UART_IIR_NO_INT
    uart.write(UART_TX, ord("a"))
    assert wire.irq == [True, False, True]  # THR empty again after the byte left


def test_each_byte_gives_a_fresh_edge(uart, wire):
    uart.write(UART_IER, UART_IER_THRI)
    uart.write(UART_TX, ord("a"))
    uart.write(UART_TX, ord("b"))
    assert wire.irq == [True, False, True, False, True]


def test_enabling_thri_again_rearms_it(uart, wire):
    uart.write(UART_IER, UART_IER_THRI)
    uart.read(UART_IIR)
    uart.write(UART_IER, UART_IER_THRI)  # unchanged: nothing happens
    assert uart.read(UART_IIR) == UART_IIR_NO_INT
    uart.write(UART_IER, 0)
    uart.write(UART_IER, UART_IER_THRI)
    assert uart.read(UART_IIR) == UART_IIR_THRI


def test_received_data_interrupt_clears_when_the_buffer_empties(uart, wire):
    uart.write(UART_IER, UART_IER_RDI)
    assert wire.irq == []
    uart.feed(b"q")
    assert wire.irq == [True]
    assert uart.read(UART_IIR) == UART_IIR_RDI
    assert uart.read(UART_IIR) == UART_IIR_RDI  # reading IIR does not acknowledge data
    uart.read(UART_RX)
    assert wire.irq == [True, False]
    assert uart.read(UART_IIR) == UART_IIR_NO_INT


def test_line_changes_are_reported_once(uart, wire):
    enable_fifo(uart)
    uart.write(UART_IER, UART_IER_RDI)
    uart.feed(b"a")
    uart.feed(b"b")
    uart.feed(b"c")
    uart.read(UART_RX)
    uart.read(UART_RX)
    assert wire.irq == [True]
    uart.read(UART_RX)
    assert wire.irq == [True, False]


def test_fifo_trigger_level_and_character_timeout(uart):
    enable_fifo(uart, trigger_bits=0xC0)  # interrupt at 14 bytes
    uart.write(UART_IER, UART_IER_RDI)
    uart.feed(b"x" * 13)
    assert uart.read(UART_IIR) == 0xC0 | UART_IIR_CTI
    uart.feed(b"y")
    assert uart.read(UART_IIR) == 0xC0 | UART_IIR_RDI
    for _ in range(14):
        uart.read(UART_RX)
    assert uart.read(UART_IIR) == 0xC0 | UART_IIR_NO_INT


@pytest.mark.parametrize("bits, level", [(0x00, 1), (0x40, 4), (0x80, 8), (0xC0, 14)])
def test_trigger_levels(uart, bits, level):
    enable_fifo(uart, bits)
    uart.write(UART_IER, UART_IER_RDI)
    uart.feed(b"z" * level)
    assert uart.read(UART_IIR) & 0x0F == UART_IIR_RDI
    uart.read(UART_RX)
    if level > 1:
        assert uart.read(UART_IIR) & 0x0F == UART_IIR_CTI


def test_iir_reports_the_highest_priority_source(uart, wire):
    uart.write(UART_IER, UART_IER_RLSI | UART_IER_RDI | UART_IER_THRI | UART_IER_MSI)
    uart.feed(b"12")  # the second byte overruns
    uart.write(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT2 | UART_MCR_RTS)  # DSR drops
    assert uart.read(UART_IIR) == UART_IIR_RLSI
    uart.read(UART_LSR)  # acknowledges the overrun
    assert uart.read(UART_IIR) == UART_IIR_RDI
    uart.read(UART_RX)
    assert uart.read(UART_IIR) == UART_IIR_THRI  # acknowledged by this very read
    assert uart.read(UART_IIR) == UART_IIR_MSI
    assert uart.read(UART_MSR) & UART_MSR_DDSR
    assert uart.read(UART_IIR) == UART_IIR_NO_INT
    assert wire.irq == [True, False]


def test_masked_sources_raise_nothing(uart, wire):
    uart.feed(b"ab")
    uart.write(UART_TX, ord("c"))
    assert uart.read(UART_IIR) == UART_IIR_NO_INT
    assert wire.irq == []


def test_reset_lowers_the_line(uart, wire):
    uart.write(UART_IER, UART_IER_THRI)
    uart.reset()
    assert wire.irq == [True, False]
    assert uart.read(UART_IER) == 0


# -- loopback -------------------------------------------------------------------------------

def test_loopback_receives_what_it_sends(uart, wire):
    uart.write(UART_MCR, UART_MCR_LOOP)
    uart.write(UART_IER, UART_IER_RDI)
    uart.write(UART_TX, 0xA5)
    assert wire.sent == b""
    assert uart.read(UART_LSR) & UART_LSR_DR
    assert uart.read(UART_RX) == 0xA5
    assert wire.irq == [True, False]


def test_loopback_refuses_outside_input(uart):
    uart.write(UART_MCR, UART_MCR_LOOP)
    assert uart.can_receive() == 0
    assert uart.feed(b"x") == 0
    assert uart.read(UART_LSR) & UART_LSR_DR == 0
    uart.write(UART_MCR, UART_MCR_OUT2)
    assert uart.feed(b"x") == 1


@pytest.mark.parametrize("mcr, msr", [
    (UART_MCR_DTR, UART_MSR_DSR), (UART_MCR_RTS, UART_MSR_CTS),
    (UART_MCR_OUT1, UART_MSR_RI), (UART_MCR_OUT2, UART_MSR_DCD), (0x0F, 0xF0), (0, 0),
])
def test_loopback_wires_modem_outputs_to_inputs(uart, mcr, msr):
    uart.write(UART_MCR, UART_MCR_LOOP | mcr)
    assert uart.read(UART_MSR) & 0xF0 == msr


def test_linux_8250_loopback_probe_passes(uart):
    # drivers/tty/serial/8250/8250_port.c, autoconfig(): MCR = LOOP | OUT2 | RTS,
    # then expects MSR & 0xF0 == DCD | CTS.
    uart.write(UART_MCR, UART_MCR_LOOP | 0x0A)
    assert uart.read(UART_MSR) & 0xF0 == UART_MSR_DCD | UART_MSR_CTS


def test_teri_marks_only_a_falling_ring(uart):
    uart.write(UART_MCR, UART_MCR_LOOP)
    uart.read(UART_MSR)
    uart.write(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT1)  # RI rises
    assert uart.read(UART_MSR) == UART_MSR_RI
    uart.write(UART_MCR, UART_MCR_LOOP)  # RI falls
    assert uart.read(UART_MSR) == UART_MSR_TERI
    assert uart.read(UART_MSR) == 0  # deltas clear once read


def test_leaving_loopback_restores_the_fixed_lines(uart):
    uart.write(UART_MCR, UART_MCR_LOOP)
    uart.write(UART_MCR, UART_MCR_OUT2)
    assert uart.read(UART_MSR) & 0xF0 == UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS


def test_a_line_connected_later_starts_at_the_current_level():
    """A board wires COM1 to IRQ 4 after the UART exists (vlab.machine.pc.add_linux_devices):
    the line is driven at once, and follows IIR from then on."""
    uart = Uart16550()
    uart.write(UART_IER, UART_IER_THRI)
    levels = []
    uart.connect_irq(levels.append)
    assert levels == [True]
    assert uart.read(UART_IIR) == UART_IIR_THRI and levels == [True, False]
