"""Assemble guest code a learner types in a cell, with nasm.

nasm (`-f bin`) turns text into the flat bytes a VMM copies into guest memory, for 16-, 32-
and 64-bit code alike, and its listing file ties every address to the source line that
produced it: that is what lets the lab show the line behind RIP.
"""
from __future__ import annotations

import bisect
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

NASM_TIMEOUT = 10.0  # seconds; nested %rep or macro loops can keep nasm busy for hours

# "source.asm:3: error: parser: instruction expected"; macro back-traces carry no level.
_DIAGNOSTIC = re.compile(r"^[^:]*:(?P<line>\d+): (?:(?P<level>error|fatal|panic|warning): )?"
                         r"(?P<message>.*)$")
# "     3 00000005 B80100     mov ax, 1"; a hex field ending in "-" continues on the next line.
_LISTING = re.compile(r"^\s*(?P<line>\d+) (?P<offset>[0-9A-F]{8}) (?P<hex>\S+)")
_DIRECTIVE = re.compile(r"^\s*\[?\s*(?P<name>bits|org)\s+(?P<value>[^\];\n]+)",
                        re.IGNORECASE | re.MULTILINE)


class AssemblyError(Exception):
    """nasm rejected the source; `errors` holds (line, message) pairs, line 0 if unknown."""

    def __init__(self, message: str, errors: list[tuple[int, str]] | None = None):
        super().__init__(message)
        self.errors = errors or []


class AssemblerNotFound(AssemblyError):
    """The `nasm` program is not installed."""


@dataclass(frozen=True)
class Assembly:
    """Assembled bytes plus where each instruction came from.

    `lines` maps the guest address of each statement that emits bytes to its source line
    (1-based, counted in `source`).
    """
    code: bytes
    bits: int
    org: int
    source: str
    lines: dict[int, int] = field(repr=False)
    warnings: tuple[str, ...] = ()

    def line_for(self, address: int) -> int | None:
        """The source line of the statement whose bytes cover `address`, if any."""
        if not self.org <= address < self.org + len(self.code):
            return None
        starts = sorted(self.lines)
        i = bisect.bisect_right(starts, address) - 1
        return self.lines[starts[i]] if i >= 0 else None

    def source_line(self, line: int) -> str:
        """The text of a 1-based source line."""
        return self.source.splitlines()[line - 1]


def _nasm_number(text: str) -> int:
    """Read a nasm numeric literal: 123, 0x7c00, 7c00h, $7c00, 0b101."""
    text = text.strip().replace("_", "")
    low = text.lower()
    try:
        if low.endswith("h"):
            return int(low[:-1], 16)
        if low.startswith("$"):
            return int(low[1:], 16)
        return int(low, 0)
    except ValueError:
        raise AssemblyError(f"cannot read the number {text!r} in the source's bits/org "
                            "directive; write a plain number or pass bits=/org= instead") from None


def _quote(source_lines: list[str], line: int) -> str:
    if 1 <= line <= len(source_lines):
        return f"\n      {source_lines[line - 1].strip()}"
    return ""


def _diagnostics(stderr: str) -> tuple[list[tuple[int, str]], list[str]]:
    """Split nasm's stderr into errors (line, message) and formatted warnings."""
    errors, warnings = [], []
    for text in stderr.splitlines():
        match = _DIAGNOSTIC.match(text)
        if not match:
            if text.strip():
                errors.append((0, text.strip()))
            continue
        line, message = int(match["line"]), match["message"]
        if match["level"] == "warning":
            warnings.append(f"line {line}: {message}")
        else:
            errors.append((line, message))
    return errors, warnings


def _line_map(listing: str, org: int) -> dict[int, int]:
    lines: dict[int, int] = {}
    continued = False
    for text in listing.splitlines():
        match = _LISTING.match(text)
        if not match:
            continue
        if not continued:
            lines[org + int(match["offset"], 16)] = int(match["line"])
        continued = match["hex"].endswith("-")
    return lines


def assemble(source: str, bits: int = 16, org: int = 0) -> Assembly:
    """Assemble `source` into flat binary code to be loaded at `org`.

    `bits` and `org` are given to nasm unless the source sets them itself, in which case
    the source's values win (and are the ones reported).
    """
    if bits not in (16, 32, 64):
        raise ValueError(f"bits must be 16, 32 or 64, not {bits!r}")
    if not isinstance(org, int) or org < 0:
        raise ValueError(f"org must be a non-negative integer, not {org!r}")
    nasm = shutil.which("nasm")
    if nasm is None:
        raise AssemblerNotFound("the nasm assembler is not installed (not on PATH); install "
                                "it with `apt-get install nasm` or "
                                "`conda install -c conda-forge nasm`")
    found = {}
    for match in _DIRECTIVE.finditer(source):
        found.setdefault(match["name"].lower(), _nasm_number(match["value"]))
    bits, org = found.get("bits", bits), found.get("org", org)
    # --before adds a line ahead of the source without shifting its line numbers.
    before = [f"--before=bits {bits}"] * ("bits" not in found)
    before += [f"--before=org {org:#x}"] * ("org" not in found)
    source_lines = source.splitlines()
    with tempfile.TemporaryDirectory(prefix="vlab-nasm-") as tmp:
        src, out, lst = (Path(tmp) / n for n in ("source.asm", "out.bin", "out.lst"))
        src.write_text(source if source.endswith("\n") else source + "\n")
        try:
            proc = subprocess.run([nasm, "-f", "bin", *before, "-o", str(out), "-l", str(lst),
                                   str(src)], capture_output=True, text=True, timeout=NASM_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssemblyError(f"nasm did not finish within {NASM_TIMEOUT:g} s "
                                "(a %rep or macro that never ends?)") from None
        errors, warnings = _diagnostics(proc.stderr)
        if proc.returncode != 0:
            errors = errors or [(0, f"nasm exited with status {proc.returncode}")]
            report = "\n".join(f"  line {line}: {message}{_quote(source_lines, line)}"
                               if line else f"  {message}" for line, message in errors)
            raise AssemblyError(f"nasm could not assemble the source:\n{report}", errors)
        code = out.read_bytes()
        lines = _line_map(lst.read_text(errors="replace"), org)
    if not code:
        raise AssemblyError("the source assembles to no bytes (it is empty, or only comments "
                            "and directives): there is nothing to run")
    return Assembly(code=code, bits=bits, org=org, source=source, lines=lines,
                    warnings=tuple(warnings))
