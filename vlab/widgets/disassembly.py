"""Disassembly: the instructions around RIP, decoded in the mode the CPU is in now."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cache

import capstone
import ipywidgets as widgets

from ..x86 import code_bits
from .base import CHANGED_STYLE, MONO, TABLE_STYLE, LabView, escape, message
from .memory import linear_rip

LOOKBEHIND = 32   # bytes before RIP searched for an instruction boundary that leads to RIP
CELL = "padding:0 4px;white-space:nowrap;vertical-align:top"
SOURCE_CELL = "padding:0 4px;vertical-align:top;color:#555"   # wraps: no horizontal scroll
CAPSTONE_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}


@cache
def _disassembler(bits: int) -> capstone.Cs:
    return capstone.Cs(capstone.CS_ARCH_X86, CAPSTONE_MODES[bits])


@dataclass(frozen=True)
class Line:
    address: int
    code: bytes
    text: str
    source: str | None     # the assembly source line, when the Lab assembled the guest
    current: bool


class Disassembly(LabView):
    """Up to `before` instructions before RIP and `after` from it (Capstone, 16/32/64-bit
    from CR0.PE, EFER.LMA and CS.L/D), each with its assembly source line when the Lab
    assembled the guest. x86 cannot be decoded backwards: the instructions before RIP are a
    best guess (see `_behind`); the current one is always decoded from RIP itself."""

    def __init__(self, lab, vcpu: int = 0, before: int = 4, after: int = 8, live: bool = True):
        super().__init__(lab, live)
        self.vcpu = vcpu
        self.before, self.after = before, after
        self.html = widgets.HTML()
        self.children = (self.caption, self.html)
        self.bits: int | None = None
        self.current: int | None = None
        self.lines: list[Line] = []
        self.refresh()

    def _attach(self) -> bool:
        return self._on_registers(self.vcpu, self.render)

    def _decode(self) -> list[Line]:
        model = self.lab.registers[self.vcpu] if len(self.lab.registers) > self.vcpu else None
        if model is None or model.current is None or self.lab.machine is None:
            raise ValueError(f"vCPU {self.vcpu} has no registers yet")
        snapshot = model.current
        bits, rip = code_bits(snapshot.sregs), linear_rip(snapshot)
        memory = self.lab.machine.memory
        region = memory.find(rip)
        if region is None:
            raise ValueError(f"RIP {rip:#x} is outside guest memory")
        low = max(region.gpa, rip - LOOKBEHIND)
        high = min(region.end, rip + 15 * self.after)   # 15: the longest x86 instruction
        code = memory.read(low, high - low)
        cs = _disassembler(bits)
        assembly = getattr(self.lab.guest, "assembly", None)
        decoded = _behind(cs, code, low, rip, assembly)[-self.before:] if self.before else []
        decoded += list(cs.disasm_lite(code[rip - low:], rip, self.after))
        self.bits = bits
        self.current = rip
        return [Line(address, code[address - low:address - low + size],
                     f"{mnemonic} {operands}".strip(), _source(assembly, address), address == rip)
                for address, size, mnemonic, operands in decoded]

    def render(self) -> None:
        try:
            self.lines = self._decode()
        except ValueError as e:   # no registers yet, or RIP outside guest memory
            self.lines, self.current = [], None
            self.html.value = message(str(e))
            return
        td = f"<td style='{CELL}'>"
        rows = []
        for line in self.lines:
            marker = (f"<tr class='vlab-current' style='{CHANGED_STYLE}'>{td}=>"
                      if line.current else f"<tr>{td}")
            rows.append(
                f"{marker}</td>{td}{line.address:08x}</td>{td}{line.code.hex(' ')}</td>"
                f"{td}{escape(line.text)}</td><td class='vlab-source' style='{SOURCE_CELL}'>"
                f"{escape('; ' + line.source) if line.source else ''}</td></tr>")
        self.html.value = (
            f"<div style='{MONO}'>{self.bits}-bit code, RIP at {self.current:#x}</div>"
            f"<table class='vlab-listing' style='{TABLE_STYLE}'>" + "".join(rows) + "</table>")

    def summary(self) -> str:
        if not self.lines:
            return f"vCPU {self.vcpu}: nothing to disassemble yet"
        return "\n".join(f"{'=>' if line.current else '  '} {line.address:#x}: {line.text}"
                         for line in self.lines)

    def __repr__(self) -> str:
        return f"Disassembly(vcpu={self.vcpu})"


def _behind(cs, code: bytes, low: int, rip: int, assembly) -> list[tuple]:
    """The instructions just before RIP. Where the Lab assembled the guest, its statement
    addresses are known instruction starts; elsewhere every start in the window is decoded
    and the instruction that most of those decodings end on, right before RIP, wins."""
    def landing_on_rip(start: int) -> list[tuple] | None:
        decoded = list(cs.disasm_lite(code[start - low:rip - low], start))
        return decoded if decoded and decoded[-1][0] + decoded[-1][1] == rip else None

    for start in sorted(a for a in assembly.lines if low <= a < rip) if assembly else ():
        if decoded := landing_on_rip(start):
            return decoded
    longest: dict[int, list[tuple]] = {}
    votes: Counter = Counter()
    for start in range(low, rip):
        if decoded := landing_on_rip(start):
            longest.setdefault(decoded[-1][0], decoded)
            votes[decoded[-1][0]] += 1
    return longest[max(votes, key=lambda address: (votes[address], address))] if votes else []


def _source(assembly, address: int) -> str | None:
    """The source statement that starts at `address` in the Lab's assembled guest."""
    if assembly is None or assembly.lines.get(address) is None:
        return None
    return " ".join(assembly.source_line(assembly.lines[address]).split())
