"""The 16550A UART, the PC's COM port, as QEMU emulates it in hw/char/serial.c.

Eight byte-wide registers at COM1's ports 0x3F8-0x3FF. Register and bit names follow
Linux's include/uapi/linux/serial_reg.h, which QEMU's code uses too, so a learner can read
the kernel's 8250 driver beside this file:

    offset  DLAB=0 read  DLAB=0 write  DLAB=1
    0       RBR          THR           DLL  divisor latch, low byte
    1       IER          IER           DLM  divisor latch, high byte
    2       IIR          FCR
    3       LCR (bit 7 is DLAB)
    4       MCR
    5       LSR (writes ignored)
    6       MSR (writes ignored)
    7       SCR

Modelling choices, each as QEMU makes them unless noted:

- Transmission is instant: a THR write goes straight to `output` and THR is empty again
  before the guest's next instruction, so LSR.THRE and LSR.TEMT always read as set (a
  polling guest never waits) and the THR-empty interrupt is re-raised after every byte.
- The receiver holds one byte, or 16 once FCR enables the FIFOs. A byte that finds it full
  sets LSR.OE and is lost (the FIFO keeps its contents; without FIFOs the new byte replaces
  the held one, as on the 16450).
- The interrupt line follows IIR: priority receiver line status (OE) > received data
  (or character timeout) > THR empty > modem status. `irq(level)` is called only when the
  level changes; a THR write drops and raises it again, the new edge an edge-triggered PIC
  needs to deliver the next interrupt.
- Received data below the FIFO trigger level signals a character timeout (IIR 0x0C).
  Hardware waits four character times first; with no clock in this model, that wait has
  always elapsed by the time the guest looks.
- In loopback (MCR bit 4) transmitted bytes are received instead of sent, `feed` input is
  refused, and the modem inputs in MSR follow the MCR outputs. Unlike QEMU, changes of those
  inputs set MSR's delta bits and can raise the modem-status interrupt, as the PC16550D
  datasheet specifies for loopback; outside loopback the lines are fixed at DCD|DSR|CTS.
- A 2- or 4-byte access is split into byte accesses to consecutive registers, as QEMU's
  memory core splits accesses for a device with `max_access_size = 1`.

`feed()` is the other end of the wire (the notebook's console input); it may run on
another thread than the vCPU, so every entry point takes the device's lock.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

# Register offsets.
UART_RX, UART_TX, UART_DLL = 0, 0, 0
UART_IER, UART_DLM = 1, 1
UART_IIR, UART_FCR = 2, 2
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

UART_IER_RDI = 0x01   # received data available
UART_IER_THRI = 0x02  # transmitter holding register empty
UART_IER_RLSI = 0x04  # receiver line status
UART_IER_MSI = 0x08   # modem status

UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_CTI = 0x0C   # character timeout
UART_IIR_ID = 0x0F
UART_IIR_FIFO_ENABLED = 0xC0

UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04
UART_FCR_TRIGGER_MASK = 0xC0
_FCR_STICKY = UART_FCR_TRIGGER_MASK | 0x08 | UART_FCR_ENABLE_FIFO  # as QEMU's `val & 0xC9`
_TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}

UART_LCR_DLAB = 0x80

UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10

UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_PE = 0x04
UART_LSR_FE = 0x08
UART_LSR_BI = 0x10
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
_LSR_INT_ANY = UART_LSR_OE | UART_LSR_PE | UART_LSR_FE | UART_LSR_BI

UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_TERI = 0x04
UART_MSR_DDCD = 0x08
UART_MSR_ANY_DELTA = 0x0F
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80

_LINES_OUTSIDE_LOOPBACK = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
_LOOPBACK_WIRING = ((UART_MCR_DTR, UART_MSR_DSR), (UART_MCR_RTS, UART_MSR_CTS),
                    (UART_MCR_OUT1, UART_MSR_RI), (UART_MCR_OUT2, UART_MSR_DCD))

FIFO_SIZE = 16


class Uart16550:
    """A 16550A UART: registers by offset, bytes out through `output`, level on `irq`."""

    IOBASE = 0x3F8  # COM1
    SIZE = 8

    def __init__(self, output: Callable[[bytes], None] | None = None,
                 irq: Callable[[bool], None] | None = None, name: str = "serial0") -> None:
        self.name = name
        self._output = output
        self._irq = irq
        self._lock = threading.RLock()
        self._rx: deque[int] = deque()
        self.irq_level = False
        self.rbr_reads = 0   # how often the guest read RBR: whether it reads COM1 at all
        self.reset()

    def connect_irq(self, irq: Callable[[bool], None]) -> None:
        """Wire the interrupt line (a board gives COM1 IRQ 4) and drive it to the current
        level, so a line connected after the guest enabled interrupts starts right."""
        with self._lock:
            self._irq = irq
            irq(self.irq_level)

    def reset(self) -> None:
        """Power-on values, as QEMU's `serial_reset`: 9600 baud 8N1, OUT2 set, all quiet."""
        with self._lock:
            self.rbr = 0
            self.thr = 0
            self.ier = 0
            self.iir = UART_IIR_NO_INT
            self.fcr = 0
            self.lcr = 0
            self.mcr = UART_MCR_OUT2
            self.lsr = UART_LSR_TEMT | UART_LSR_THRE
            self.msr = _LINES_OUTSIDE_LOOPBACK
            self.scr = 0
            self.divisor = 0x0C
            self.trigger_level = 1
            self.thr_ipending = False
            self._rx.clear()
            self._update_irq()

    # -- the guest's side -----------------------------------------------------------------

    def read(self, offset: int, size: int = 1) -> int:
        with self._lock:
            value = 0
            for i in range(size):
                value |= self._read_register((offset + i) & 7) << (8 * i)
            return value

    def write(self, offset: int, value: int, size: int = 1) -> None:
        with self._lock:
            for i in range(size):
                self._write_register((offset + i) & 7, (value >> (8 * i)) & 0xFF)

    def _read_register(self, reg: int) -> int:
        dlab = self.lcr & UART_LCR_DLAB
        if reg == UART_RX:
            if dlab:
                return self.divisor & 0xFF
            self.rbr_reads += 1
            if self._rx:
                self.rbr = self._rx.popleft()
            if not self._rx:
                self.lsr &= ~(UART_LSR_DR | UART_LSR_BI)
            self._update_irq()
            return self.rbr
        if reg == UART_IER:
            return self.divisor >> 8 if dlab else self.ier
        if reg == UART_IIR:
            iir = self.iir
            if iir & UART_IIR_ID == UART_IIR_THRI:  # reading IIR acknowledges THR empty
                self.thr_ipending = False
                self._update_irq()
            return iir
        if reg == UART_LCR:
            return self.lcr
        if reg == UART_MCR:
            return self.mcr
        if reg == UART_LSR:
            lsr = self.lsr
            if lsr & (UART_LSR_BI | UART_LSR_OE):  # error bits clear once seen
                self.lsr &= ~(UART_LSR_BI | UART_LSR_OE)
                self._update_irq()
            return lsr
        if reg == UART_MSR:
            msr = self.msr
            if msr & UART_MSR_ANY_DELTA:  # delta bits clear once seen
                self.msr &= ~UART_MSR_ANY_DELTA
                self._update_irq()
            return msr
        return self.scr

    def _write_register(self, reg: int, value: int) -> None:
        dlab = self.lcr & UART_LCR_DLAB
        if reg == UART_TX:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif reg == UART_IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif reg == UART_FCR:
            self._write_fcr(value)
        elif reg == UART_LCR:
            self.lcr = value
        elif reg == UART_MCR:
            self.mcr = value & 0x1F
            self._set_modem_inputs()
        elif reg == UART_SCR:
            self.scr = value

    def _transmit(self, value: int) -> None:
        self.thr = value
        self.thr_ipending = False
        self.lsr &= ~(UART_LSR_THRE | UART_LSR_TEMT)
        self._update_irq()
        if self.mcr & UART_MCR_LOOP:
            self._receive(value)
        elif self._output is not None:
            self._output(bytes((value,)))
        self.lsr |= UART_LSR_THRE | UART_LSR_TEMT
        self.thr_ipending = True
        self._update_irq()

    def _write_ier(self, value: int) -> None:
        changed = (self.ier ^ value) & 0x0F
        self.ier = value & 0x0F
        # Enabling THRI re-arms the THR-empty interrupt even if IIR was read since
        # (QEMU: "not in the datasheet, but Windows relies on it").
        if changed & UART_IER_THRI:
            self.thr_ipending = bool(self.ier & UART_IER_THRI and self.lsr & UART_LSR_THRE)
        if changed:
            self._update_irq()

    def _write_fcr(self, value: int) -> None:
        if (value ^ self.fcr) & UART_FCR_ENABLE_FIFO:  # switching FIFOs on or off flushes them
            value |= UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT
        if value & UART_FCR_CLEAR_RCVR:
            self._rx.clear()
            self.lsr &= ~(UART_LSR_DR | UART_LSR_BI)
        if value & UART_FCR_CLEAR_XMIT:
            self.thr_ipending = True
        self.fcr = value & _FCR_STICKY
        self.trigger_level = _TRIGGER_LEVELS[value & UART_FCR_TRIGGER_MASK]
        self._update_irq()

    def _set_modem_inputs(self) -> None:
        if self.mcr & UART_MCR_LOOP:
            lines = 0
            for output_bit, input_bit in _LOOPBACK_WIRING:
                if self.mcr & output_bit:
                    lines |= input_bit
        else:
            lines = _LINES_OUTSIDE_LOOPBACK
        old = self.msr
        delta = ((old ^ lines) >> 4) & UART_MSR_ANY_DELTA
        if not old & UART_MSR_RI:  # TERI marks only a falling RI
            delta &= ~UART_MSR_TERI
        self.msr = lines | (old & UART_MSR_ANY_DELTA) | delta
        self._update_irq()

    # -- the wire's side ------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Receive `data` as if typed on the far end; returns how many bytes were kept.

        Bytes that find the receiver full overrun it (LSR.OE); in loopback the receiver
        listens to the transmitter only, so nothing is taken.
        """
        with self._lock:
            if self.mcr & UART_MCR_LOOP:
                return 0
            kept = sum(self._receive(byte) for byte in data)
            self._update_irq()
            return kept

    def feed_what_fits(self, data: bytes) -> int:
        """Feed as much of `data` as the receiver takes without overrun, as QEMU's chardev
        does by asking `serial_can_receive` first; returns how many bytes it took."""
        with self._lock:
            return self.feed(data[:self.can_receive()])

    def can_receive(self) -> int:
        """Bytes the receiver can take without overrun (QEMU's `serial_can_receive`)."""
        with self._lock:
            if self.mcr & UART_MCR_LOOP:
                return 0
            return self._rx_capacity() - len(self._rx)

    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self.fcr & UART_FCR_ENABLE_FIFO else 1

    def _receive(self, byte: int) -> bool:
        self.lsr |= UART_LSR_DR
        if len(self._rx) < self._rx_capacity():
            self._rx.append(byte)
            return True
        self.lsr |= UART_LSR_OE
        if not self.fcr & UART_FCR_ENABLE_FIFO:
            self._rx[0] = byte
        return False

    # -- the interrupt line ---------------------------------------------------------------

    def _update_irq(self) -> None:
        ier, lsr = self.ier, self.lsr
        if ier & UART_IER_RLSI and lsr & _LSR_INT_ANY:
            iid = UART_IIR_RLSI
        elif ier & UART_IER_RDI and lsr & UART_LSR_DR:
            fifo = self.fcr & UART_FCR_ENABLE_FIFO
            iid = UART_IIR_CTI if fifo and len(self._rx) < self.trigger_level else UART_IIR_RDI
        elif ier & UART_IER_THRI and self.thr_ipending:
            iid = UART_IIR_THRI
        elif ier & UART_IER_MSI and self.msr & UART_MSR_ANY_DELTA:
            iid = UART_IIR_MSI
        else:
            iid = UART_IIR_NO_INT
        self.iir = iid | (UART_IIR_FIFO_ENABLED if self.fcr & UART_FCR_ENABLE_FIFO else 0)
        level = iid != UART_IIR_NO_INT
        if level != self.irq_level:
            self.irq_level = level
            if self._irq is not None:
                self._irq(level)

    def state(self) -> dict:
        """Every register by its name, plus the receive FIFO and the interrupt line."""
        with self._lock:
            return {
                "rbr": self.rbr, "thr": self.thr, "ier": self.ier, "iir": self.iir,
                "fcr": self.fcr, "lcr": self.lcr, "mcr": self.mcr, "lsr": self.lsr,
                "msr": self.msr, "scr": self.scr,
                "dll": self.divisor & 0xFF, "dlm": self.divisor >> 8,
                "rx_fifo": bytes(self._rx), "irq": self.irq_level,
            }
