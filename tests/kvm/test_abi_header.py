"""`vlab/kvm/abi.py` against the real `<linux/kvm.h>`.

abi.py declares the KVM ABI by hand so that vlab needs no compiler at run time; this test is
what makes that safe. It generates a C program from what abi.py declares (every struct's
size, alignment and field offsets, sizes and signedness; every ioctl number, exit reason,
capability and constant), compiles it against the installed kernel headers and compares the
numbers. Macros are `#ifdef`-guarded, so a name the header lacks is reported, not a compile
error. A newer header (a later kernel) may define exits and capabilities vlab does not know:
those are named in a warning (`NewerHeader`), while anything vlab declares must match. Needs
only gcc and the headers, not /dev/kvm.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass

import pytest

from vlab.kvm import abi
from vlab.kvm.abi import (Cap, ExitReason, InternalErrorSuberror, Ioctl, MpState, StatType,
                          StatUnit, SystemEventType, ffi)

HEADERS = ("linux/kvm.h", "asm/kvm.h")

# Enum -> (macro naming a member, C expression for its value).
ENUM_MACROS = {
    Ioctl: ("KVM_{}", "KVM_{}"),
    ExitReason: ("KVM_EXIT_{}", "KVM_EXIT_{}"),
    InternalErrorSuberror: ("KVM_INTERNAL_ERROR_{}", "KVM_INTERNAL_ERROR_{}"),
    SystemEventType: ("KVM_SYSTEM_EVENT_{}", "KVM_SYSTEM_EVENT_{}"),
    MpState: ("KVM_MP_STATE_{}", "KVM_MP_STATE_{}"),
    StatType: ("KVM_STATS_TYPE_{}", "KVM_STATS_TYPE_{} >> KVM_STATS_TYPE_SHIFT"),
    StatUnit: ("KVM_STATS_UNIT_{}", "KVM_STATS_UNIT_{} >> KVM_STATS_UNIT_SHIFT"),
}
# abi.py constants the uapi headers do not define, and why.
NOT_IN_HEADER = {"KVM_MAX_CPUID_ENTRIES": "QEMU's limit; the kernel's is not uapi"}
# Constant families vlab uses: if one vanished from abi.py, test_constants would check nothing.
REQUIRED_FAMILIES = ("KVM_MEM_", "KVM_GUESTDBG_", "KVM_SYNC_X86_", "KVM_MSR_EXIT_REASON_",
                     "KVM_EXIT_IO_")


@dataclass(frozen=True)
class Check:
    """One number abi.py claims, and the C expression the header gives it by."""
    label: str
    expr: str
    expected: int
    guard: str | None = None  # a macro that must be defined for `expr` to compile


def _is_anonymous(ctype) -> bool:
    return ctype.kind in ("struct", "union") and "$" in ctype.cname


def _layout_checks(struct: str) -> list[Check]:
    """Size and alignment of `struct`, then every field: offset, size (unless a flexible
    array) and, for integers, signedness. Anonymous nested structs and unions are walked
    by member path (`io.port`); named ones are only placed here and checked on their own."""
    ctype = ffi.typeof(struct)
    checks = [Check(f"sizeof({struct})", f"sizeof({struct})", ffi.sizeof(ctype)),
              Check(f"_Alignof({struct})", f"_Alignof({struct})", ffi.alignof(ctype))]

    def walk(parent, prefix: str, base: int) -> None:
        for name, field in parent.fields:
            path, ftype, offset = prefix + name, field.type, base + field.offset
            member = f"((({struct} *)0)->{path})"
            checks.append(Check(f"offsetof({struct}, {path})", f"offsetof({struct}, {path})", offset))
            if not (ftype.kind == "array" and ftype.length is None):
                checks.append(Check(f"size of {struct}.{path}", f"sizeof{member}", ffi.sizeof(ftype)))
            if ftype.kind == "primitive" and ftype.cname != "char":
                checks.append(Check(f"signedness of {struct}.{path} (1 = signed)",
                                    f"((__typeof__{member})-1 < 0)", int(ffi.cast(ftype, -1) < 0)))
            if _is_anonymous(ftype):
                walk(ftype, path + ".", offset)

    walk(ctype, "", 0)
    return checks


def _structs() -> list[str]:
    _typedefs, structs, unions = ffi.list_types()
    return [f"struct {name}" for name in structs] + [f"union {name}" for name in unions]


def _enum_checks() -> list[Check]:
    checks = []
    for enum, (macro, expr) in ENUM_MACROS.items():
        for name, member in enum.__members__.items():  # aliases too
            checks.append(Check(f"{enum.__name__}.{name}", expr.format(name), int(member),
                                macro.format(name)))
    return checks


def _constants() -> dict[str, int]:
    return {name: value for name, value in vars(abi).items()
            if name.startswith("KVM") and name.isupper() and type(value) is int}


def _constant_checks() -> list[Check]:
    return [Check(name, name, value, name) for name, value in _constants().items()
            if name not in NOT_IN_HEADER]


def _cap_checks() -> list[Check]:
    return [Check(f"Cap.{name}", f"KVM_CAP_{name}", int(member), f"KVM_CAP_{name}")
            for name, member in Cap.__members__.items()]


def _program(checks: list[Check]) -> str:
    """C printing `index value` per check, or `index -` when its guard macro is undefined."""
    lines = ["#include <stddef.h>", "#include <stdio.h>"]
    lines += [f"#include <{header}>" for header in HEADERS]
    lines.append("int main(void) {")
    for i, check in enumerate(checks):
        show = f'    printf("{i} %lld\\n", (long long)({check.expr}));'
        if check.guard:
            lines += [f"#ifdef {check.guard}", show, "#else", f'    printf("{i} -\\n");', "#endif"]
        else:
            lines.append(show)
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def _header_path(gcc: str) -> str | None:
    """The `<linux/kvm.h>` gcc actually includes (from its dependency output), or None."""
    probe = subprocess.run([gcc, "-M", "-xc", "-"], input="#include <linux/kvm.h>\n",
                           capture_output=True, text=True)
    if probe.returncode:
        return None
    deps = probe.stdout.replace("\\\n", " ").split()
    return next((path for path in deps if path.endswith("/linux/kvm.h")), None)


@dataclass
class Header:
    values: dict[str, int | None]  # check label -> the header's value (None: macro undefined)
    text: str                      # <linux/kvm.h>, for what only a scan of it can tell


@pytest.fixture(scope="module")
def header(tmp_path_factory) -> Header:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot compile against <linux/kvm.h>")
    path = _header_path(gcc)
    if path is None:
        pytest.skip("<linux/kvm.h> is not installed (Debian: linux-libc-dev)")
    checks = [c for s in _structs() for c in _layout_checks(s)]
    checks += _enum_checks() + _cap_checks() + _constant_checks()
    work = tmp_path_factory.mktemp("abi_header")
    (work / "abi_check.c").write_text(_program(checks))
    build = subprocess.run([gcc, "-std=gnu11", "-o", "abi_check", "abi_check.c"], cwd=work,
                           capture_output=True, text=True)
    assert build.returncode == 0, (
        f"the C program generated from abi.py does not compile against {path}; a struct or "
        f"field abi.py declares is missing or misnamed there:\n{build.stderr}")
    out = subprocess.run([str(work / "abi_check")], capture_output=True, text=True, check=True)
    values: dict[str, int | None] = {}
    for line in out.stdout.splitlines():
        index, value = line.split()
        values[checks[int(index)].label] = None if value == "-" else int(value)
    assert len(values) == len(checks), "the generated program did not report every check"
    with open(path) as f:
        return Header(values, f.read())


def _mismatches(checks: list[Check], header: Header) -> list[str]:
    problems = []
    for check in checks:
        actual = header.values[check.label]
        if actual is None:
            problems.append(f"{check.label}: vlab {check.expected:#x}, header lacks {check.guard}")
        elif actual != check.expected:
            problems.append(f"{check.label}: vlab {check.expected} ({check.expected:#x}), "
                            f"<linux/kvm.h> {actual} ({actual:#x})")
    return problems


def _assert_none(problems: list[str], what: str) -> None:
    assert not problems, f"{len(problems)} {what} differ from the kernel header:\n  " + \
        "\n  ".join(problems)


def test_every_struct_is_checked():
    assert {"struct kvm_run", "struct kvm_regs", "struct kvm_sregs"} <= set(_structs())


@pytest.mark.parametrize("struct", _structs())
def test_struct_layout(header, struct):
    _assert_none(_mismatches(_layout_checks(struct), header), f"layout facts of {struct}")


def test_kvm_run_union_members_share_offset(header):
    """The exit payloads are members of kvm_run's anonymous union, all at one offset."""
    offsets = {name: header.values[f"offsetof(struct kvm_run, {name})"]
               for name, field in ffi.typeof("struct kvm_run").fields if field.flags}
    assert len(set(offsets.values())) == 1, offsets


def test_ioctl_numbers(header):
    checks = [c for c in _enum_checks() if c.label.startswith("Ioctl.")]
    _assert_none(_mismatches(checks, header), "ioctl numbers")


@pytest.mark.parametrize("enum", [e for e in ENUM_MACROS if e is not Ioctl],
                         ids=lambda e: e.__name__)
def test_enum_values(header, enum):
    checks = [c for c in _enum_checks() if c.label.startswith(enum.__name__ + ".")]
    _assert_none(_mismatches(checks, header), f"{enum.__name__} values")


class NewerHeader(UserWarning):
    """<linux/kvm.h> defines something newer than vlab's ABI: worth knowing, no error."""


def unknown_to_vlab(defined: dict[str, int], known: dict[str, int], prefix: str) -> tuple[list[str], list[str]]:
    """The header's `defined` names that vlab's `known` lacks, as (newer, problems). Numbered
    above everything vlab knows, a name is newer than vlab (the header is from a later
    kernel): vlab does without it. Numbered within vlab's range, it is one vlab should have
    had, or a number vlab gives another name: a real mismatch."""
    newest = max(known.values())
    by_number = {value: name for name, value in known.items()}
    newer, problems = [], []
    for name, value in sorted(defined.items(), key=lambda item: item[1]):
        if name in known:
            continue
        if value in by_number:
            problems.append(f"{prefix}{name} = {value}: vlab calls {value} {by_number[value]}")
        elif value > newest:
            newer.append(f"{prefix}{name} = {value}")
        else:
            problems.append(f"{prefix}{name} = {value}: missing from vlab, which knows up to {newest}")
    return newer, problems


def _report_unknown(defined: dict[str, int], enum, prefix: str) -> None:
    known = {name: int(member) for name, member in enum.__members__.items()}
    newer, problems = unknown_to_vlab(defined, known, prefix)
    if newer:
        warnings.warn(NewerHeader(f"<linux/kvm.h> is newer than vlab's {enum.__name__} "
                                  f"(vlab.kvm.abi), which does not name: {', '.join(newer)}"))
    assert not problems, f"{prefix}* in the header that {enum.__name__} does not match:\n  " + \
        "\n  ".join(problems)


def test_exit_reason_lists_every_header_exit(header):
    """ExitReason names every KVM_EXIT_* of the header's exit-reason block (the run of
    defines from KVM_EXIT_UNKNOWN; other KVM_EXIT_* macros are sub-types of one exit), up
    to the newest exit vlab knows; newer ones are named in a warning."""
    block = re.search(r"^#define\s+KVM_EXIT_UNKNOWN\s+0\b.*\n(?:#define\s+KVM_EXIT_\w+\s+\d+.*\n)*",
                      header.text, re.MULTILINE)
    assert block, "no KVM_EXIT_UNKNOWN block in <linux/kvm.h>"
    defined = {name: int(value) for name, value in re.findall(r"KVM_EXIT_(\w+)\s+(\d+)", block.group())}
    _report_unknown(defined, ExitReason, "KVM_EXIT_")


def _header_caps(text: str) -> dict[str, int]:
    return {name: int(value) for name, value in
            re.findall(r"^#define\s+KVM_CAP_(\w+)\s+(\d+)\b", text, re.MULTILINE)}


def test_cap_values(header):
    """Each Cap member equals the header's KVM_CAP_*. One the compiled header leaves out is
    compared with its text (a cap under another arch's `#ifdef`); one absent from the text
    too must be newer than the header, i.e. numbered above all its caps."""
    text_caps = _header_caps(header.text)
    newest = max(text_caps.values())
    problems = _mismatches([c for c in _cap_checks() if header.values[c.label] is not None], header)
    for name, member in Cap.__members__.items():
        if header.values[f"Cap.{name}"] is not None:
            continue
        if name in text_caps:
            if text_caps[name] != member:
                problems.append(f"Cap.{name}: vlab {int(member)}, <linux/kvm.h> text {text_caps[name]}")
        elif member <= newest:
            problems.append(f"Cap.{name} = {int(member)}: no KVM_CAP_{name} in the header, whose "
                            f"caps go up to {newest}, so it is not a newer capability")
    _assert_none(problems, "capabilities")


def test_cap_lists_every_header_cap(header):
    """Cap names every KVM_CAP_* up to the newest capability vlab knows; newer ones are
    named in a warning."""
    _report_unknown(_header_caps(header.text), Cap, "KVM_CAP_")


def test_what_a_newer_header_adds_is_named_not_a_failure():
    known = {"UNKNOWN": 0, "IO": 2, "HLT": 5}
    newer, problems = unknown_to_vlab({"UNKNOWN": 0, "IO": 2, "HLT": 5, "NEW": 9, "NEWER": 12},
                                      known, "KVM_EXIT_")
    assert (newer, problems) == (["KVM_EXIT_NEW = 9", "KVM_EXIT_NEWER = 12"], [])
    newer, problems = unknown_to_vlab({"UNKNOWN": 0, "IO": 2, "OLD": 3, "HALT": 5}, known, "KVM_EXIT_")
    assert newer == [] and problems == [
        "KVM_EXIT_OLD = 3: missing from vlab, which knows up to 5",
        "KVM_EXIT_HALT = 5: vlab calls 5 HLT"]
    with pytest.warns(NewerHeader, match=r"newer than vlab's Cap .* KVM_CAP_FUTURE = 100000"):
        _report_unknown({**{n: int(m) for n, m in Cap.__members__.items()}, "FUTURE": 100000},
                        Cap, "KVM_CAP_")


def test_constants(header):
    constants = _constants()
    for family in REQUIRED_FAMILIES:
        assert any(name.startswith(family) for name in constants), f"abi.py has no {family}* constant"
    _assert_none(_mismatches(_constant_checks(), header), "constants")
