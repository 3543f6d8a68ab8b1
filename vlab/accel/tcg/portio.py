"""Where RIP is after an OUT, for port I/O handled inside emulation.

Unicorn calls its OUT hook with RIP still at the instruction. KVM's instruction emulator
reports an OUT exit with RIP past it, since the data has been taken, or, for one element of
a `rep outs` with more to go, still at it (an IN is reported at the instruction, which
completes when it gets its answer). `IoShape` decides between the two, decoded once per
instruction address from the instruction's bytes: its length and, for a repeated string
instruction, the width of the count register (CX, ECX or RCX, by address size).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...kvm.state import Segment
from ...x86 import ADDRESS_SIZE_PREFIX, REP_PREFIXES, opcode_offset

_WITH_IMM8 = frozenset({0xE4, 0xE5, 0xE6, 0xE7})          # in al/ax/eax, imm8; out imm8, ...
_PORT_IN_DX = frozenset({0xEC, 0xED, 0xEE, 0xEF})         # in/out with the port in DX
_STRING = frozenset({0x6C, 0x6D, 0x6E, 0x6F})             # ins/outs
_MASKS = {16: 0xFFFF, 32: 0xFFFFFFFF, 64: (1 << 64) - 1}


class NotPortIo(ValueError):
    """The bytes at RIP are not an IN, OUT, INS or OUTS instruction."""


@dataclass(frozen=True, slots=True)
class IoShape:
    length: int
    count_mask: int = 0   # non-zero: a repeated string instruction, its count register's width

    def rip_after(self, rip: int, count: int) -> int:
        """RIP as KVM reports it at the exit, given RIP at the instruction and the count
        register before this element."""
        if self.count_mask and (count & self.count_mask) > 1:
            return rip
        return rip + self.length


def io_shape(code: bytes, cs: Segment) -> IoShape:
    """Decode the port-I/O instruction at the start of `code`, run with code segment `cs`."""
    long_mode = bool(cs.l)
    length = opcode_offset(code, long_mode)
    opcode = None if length is None else code[length]
    if opcode in _WITH_IMM8:
        return IoShape(length + 2)
    if opcode in _PORT_IN_DX:
        return IoShape(length + 1)
    if opcode in _STRING:
        prefixes = code[:length]
        if REP_PREFIXES.isdisjoint(prefixes):
            return IoShape(length + 1)
        address_override = ADDRESS_SIZE_PREFIX in prefixes
        if long_mode:
            address_size = 32 if address_override else 64
        else:
            address_size = 16 if bool(cs.db) == address_override else 32
        return IoShape(length + 1, _MASKS[address_size])
    raise NotPortIo(f"{code.hex(' ')} is not a port-I/O instruction")
