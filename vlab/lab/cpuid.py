"""The CPU model as QEMU builds it in userspace: a CPUID table, feature by feature.

`x86_cpu_realizefn` fixes the features of the model (`-cpu host` takes what KVM supports,
KVM_GET_SUPPORTED_CPUID; a named model such as `qemu64` masks it to a documented set), and
`kvm_arch_init_vcpu` hands the table to KVM with KVM_SET_CPUID2. Feature names are Linux's
(`/proc/cpuinfo`, arch/x86/include/asm/cpufeatures.h), the words learners see elsewhere.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..kvm.state import CpuidEntry
from ..x86 import with_hypervisor_bit
from .observable import Observable

# (leaf, subleaf, register) -> {bit: name}
FEATURE_BITS: dict[tuple[int, int, str], dict[int, str]] = {
    (1, 0, "edx"): dict(enumerate((
        "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", None, "sep",
        "mtrr", "pge", "mca", "cmov", "pat", "pse36", "pn", "clflush", None, "ds", "acpi",
        "mmx", "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64", "pbe"))),
    (1, 0, "ecx"): dict(enumerate((
        "pni", "pclmulqdq", "dtes64", "monitor", "ds_cpl", "vmx", "smx", "est", "tm2",
        "ssse3", "cid", "sdbg", "fma", "cx16", "xtpr", "pdcm", None, "pcid", "dca", "sse4_1",
        "sse4_2", "x2apic", "movbe", "popcnt", "tsc_deadline_timer", "aes", "xsave",
        "osxsave", "avx", "f16c", "rdrand", "hypervisor"))),
    (7, 0, "ebx"): dict(enumerate((
        "fsgsbase", "tsc_adjust", "sgx", "bmi1", "hle", "avx2", "fdp_excptn_only", "smep",
        "bmi2", "erms", "invpcid", "rtm", "cqm", "zero_fcs_fds", "mpx", "rdt_a", "avx512f",
        "avx512dq", "rdseed", "adx", "smap", "avx512ifma", "pcommit", "clflushopt", "clwb",
        "intel_pt", "avx512pf", "avx512er", "avx512cd", "sha_ni", "avx512bw", "avx512vl"))),
    (7, 0, "ecx"): {0: "prefetchwt1", 1: "avx512vbmi", 2: "umip", 3: "pku", 4: "ospke",
                    5: "waitpkg", 6: "avx512_vbmi2", 7: "shstk", 8: "gfni", 9: "vaes",
                    10: "vpclmulqdq", 11: "avx512_vnni", 12: "avx512_bitalg", 13: "tme",
                    14: "avx512_vpopcntdq", 16: "la57", 22: "rdpid", 23: "kl",
                    24: "bus_lock_detect", 25: "cldemote", 27: "movdiri", 28: "movdir64b",
                    29: "enqcmd", 30: "sgx_lc", 31: "pks"},
    (7, 0, "edx"): {2: "avx512_4vnniw", 3: "avx512_4fmaps", 4: "fsrm", 8: "avx512_vp2intersect",
                    10: "md_clear", 14: "serialize", 15: "hybrid_cpu", 16: "tsxldtrk",
                    18: "pconfig", 19: "arch_lbr", 20: "ibt", 22: "amx_bf16", 23: "avx512_fp16",
                    24: "amx_tile", 25: "amx_int8", 26: "spec_ctrl", 27: "intel_stibp",
                    28: "flush_l1d", 29: "arch_capabilities", 30: "core_capabilities",
                    31: "spec_ctrl_ssbd"},
    (0x80000001, 0, "edx"): {11: "syscall", 19: "mp", 20: "nx", 22: "mmxext",
                             25: "fxsr_opt", 26: "pdpe1gb", 27: "rdtscp", 29: "lm",
                             30: "3dnowext", 31: "3dnow"},
    (0x80000001, 0, "ecx"): {0: "lahf_lm", 1: "cmp_legacy", 2: "svm", 3: "extapic",
                             4: "cr8_legacy", 5: "abm", 6: "sse4a", 7: "misalignsse",
                             8: "3dnowprefetch", 9: "osvw", 10: "ibs", 11: "xop", 12: "skinit",
                             13: "wdt", 15: "lwp", 16: "fma4", 17: "tce", 19: "nodeid_msr",
                             21: "tbm", 22: "topoext", 23: "perfctr_core", 24: "perfctr_nb",
                             26: "bpext", 27: "ptsc", 28: "perfctr_llc", 29: "mwaitx"},
}

FEATURES: dict[str, tuple[int, int, str, int]] = {
    name: (leaf, subleaf, reg, bit)
    for (leaf, subleaf, reg), bits in FEATURE_BITS.items()
    for bit, name in bits.items() if name
}

# QEMU's qemu64 model (target/i386/cpu.c: builtin_x86_defs): the x86-64 baseline every
# 64-bit CPU has. The vendor string is kept from the host so KVM's vendor checks agree.
QEMU64_FEATURES = frozenset((
    "fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca",
    "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2",
    "pni", "cx16", "hypervisor",
    "syscall", "nx", "lm", "lahf_lm",
))
CPU_MODELS = {
    "host": "every feature KVM supports on this host (KVM_GET_SUPPORTED_CPUID), as -cpu host",
    "max": "as host: under KVM, QEMU's max model enables everything KVM supports",
    "qemu64": "QEMU's qemu64 baseline: " + ", ".join(sorted(QEMU64_FEATURES)),
}


def parse_cpu_spec(spec: str) -> tuple[str, list[tuple[str, bool]]]:
    """QEMU's `-cpu MODEL[,+feat][,-feat][,feat=on|off]`: the model and the feature edits,
    in order (the last word on a feature wins). Names are checked, not the host."""
    model, *edits = [part.strip() for part in spec.split(",")]
    if model not in CPU_MODELS:
        raise ValueError(f"unknown CPU model {model!r}; choose one of {', '.join(CPU_MODELS)}")
    changes = []
    for edit in edits:
        name, _, value = edit.partition("=")
        if edit[:1] in "+-" and not value:
            name, enabled = edit[1:], edit[0] == "+"
        elif value in ("on", "off"):
            enabled = value == "on"
        else:
            raise ValueError(f"CPU feature edit {edit!r}: write +feat, -feat or feat=on|off")
        try:
            CpuidTable._locate(name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        changes.append((name, enabled))
    return model, changes


# Bits KVM keeps up to date in a vCPU's table after KVM_SET_CPUID2, on every backend
# (kvm_update_cpuid_runtime, arch/x86/kvm/cpuid.c): they follow the vCPU's state, not what
# the VMM set. The guest's CPUID and KVM_GET_CPUID2 show them so.
KVM_MAINTAINED_BITS: dict[tuple[int, int, str], int] = {
    (0x1, 0, "ecx"): 1 << 27,     # OSXSAVE: CR4.OSXSAVE
    (0x1, 0, "edx"): 1 << 9,      # APIC: the enable bit of IA32_APIC_BASE
    (0x7, 0, "ecx"): 1 << 4,      # OSPKE: CR4.PKE
    (0xD, 0, "ebx"): 0xFFFFFFFF,  # XSAVE area size for the current XCR0
    (0xD, 1, "ebx"): 0xFFFFFFFF,  # ... for XCR0 | IA32_XSS (XSAVES)
}


class CpuidFrozen(RuntimeError):
    """The table was already given to the vCPU with KVM_SET_CPUID2."""


def _vendor(entry: CpuidEntry) -> str:
    return b"".join(v.to_bytes(4, "little") for v in (entry.ebx, entry.edx, entry.ecx)).decode(
        "ascii", "replace")


@dataclass(frozen=True)
class CpuidChange:
    leaf: int
    subleaf: int
    register: str
    before: int
    after: int

    @property
    def kvm_maintained(self) -> bool:
        """Every changed bit is one KVM keeps up to date itself (KVM_MAINTAINED_BITS)."""
        mask = KVM_MAINTAINED_BITS.get((self.leaf, self.subleaf, self.register), 0)
        return not (self.before ^ self.after) & ~mask

    @property
    def features(self) -> list[str]:
        bits = FEATURE_BITS.get((self.leaf, self.subleaf, self.register), {})
        changed = self.before ^ self.after
        return [("+" if self.after >> b & 1 else "-") + (bits.get(b) or f"bit{b}")
                for b in range(32) if changed >> b & 1]


class CpuidTable(Observable):
    """A vCPU's CPUID table: leaves, decoded features, edits, and the diff against the host."""

    def __init__(self, entries: list[CpuidEntry], host: list[CpuidEntry], model: str = "host"):
        super().__init__()
        self.entries = list(entries)
        self.host = list(host)
        self.model = model
        self.frozen = False

    @classmethod
    def for_model(cls, model: str, host: list[CpuidEntry]) -> "CpuidTable":
        """The model's table from `host` (KVM_GET_SUPPORTED_CPUID) with QEMU's fix-up: the
        hypervisor bit, which KVM does not report but QEMU always offers
        (kvm_arch_get_supported_cpuid, target/i386/kvm.c), so that guests know they are one."""
        if model not in CPU_MODELS:
            raise ValueError(f"unknown CPU model {model!r}; choose one of {', '.join(CPU_MODELS)}")
        host = with_hypervisor_bit(host)
        table = cls(host, host, model)
        if model == "qemu64":
            for (leaf, subleaf, reg), bits in FEATURE_BITS.items():
                for bit, name in bits.items():
                    if name and name not in QEMU64_FEATURES and table.has(name):
                        table._set_bit(leaf, subleaf, reg, bit, False)
        return table

    @classmethod
    def from_spec(cls, spec: str, host: list[CpuidEntry]) -> "CpuidTable":
        """The table QEMU's `-cpu SPEC` gives (`parse_cpu_spec`): the model, then each
        feature edit. A feature the host's KVM lacks cannot be turned on."""
        model, changes = parse_cpu_spec(spec)
        table = cls.for_model(model, host)
        table.model = spec
        for name, enabled in changes:
            if enabled and not cls(host, host).has(name):
                raise ValueError(f"-cpu {spec}: this host's KVM does not support {name}, so "
                                 "it cannot be turned on (KVM_GET_SUPPORTED_CPUID lacks it)")
            table.set_feature(name, enabled)
        return table

    def find(self, leaf: int, subleaf: int = 0) -> CpuidEntry | None:
        for entry in self.entries:
            if entry.function == leaf and entry.index == subleaf:
                return entry
        for entry in self.entries:  # leaves without subleaves ignore ECX
            if entry.function == leaf and not entry.flags & 1:
                return entry
        return None

    @property
    def vendor(self) -> str:
        leaf0 = self.find(0)
        return _vendor(leaf0) if leaf0 else "?"

    def has(self, feature: str) -> bool:
        leaf, subleaf, reg, bit = self._locate(feature)
        entry = self.find(leaf, subleaf)
        return bool(entry and getattr(entry, reg) >> bit & 1)

    def features(self, leaf: int | None = None) -> list[str]:
        """Names of the features the table reports (optionally of one leaf)."""
        return [name for name, (lf, _, _, _) in FEATURES.items()
                if (leaf is None or lf == leaf) and self.has(name)]

    def set_feature(self, feature: str, enabled: bool) -> None:
        """Turn a feature on or off, as `-cpu host,-lm` would."""
        if self.frozen:
            raise CpuidFrozen(
                "the CPUID table was given to the vCPU with KVM_SET_CPUID2 "
                "(kvm_arch_init_vcpu); QEMU fixes it there and KVM refuses changes once the "
                "vCPU has run. Edit it before that stage.")
        leaf, subleaf, reg, bit = self._locate(feature)
        if self.find(leaf, subleaf) is None:
            raise KeyError(f"the table has no leaf {leaf:#x} for feature {feature!r}")
        self._set_bit(leaf, subleaf, reg, bit, enabled)
        self.notify(feature=feature, enabled=enabled)

    def _set_bit(self, leaf, subleaf, reg, bit, enabled) -> None:
        entry = self.find(leaf, subleaf)
        value = getattr(entry, reg)
        value = value | (1 << bit) if enabled else value & ~(1 << bit)
        self.entries[self.entries.index(entry)] = entry.replace(**{reg: value})

    @staticmethod
    def _locate(feature: str) -> tuple[int, int, str, int]:
        try:
            return FEATURES[feature]
        except KeyError:
            wanted = feature.lower()
            close = list(dict.fromkeys(
                [n for n in FEATURES if wanted in n]
                + difflib.get_close_matches(wanted, FEATURES, n=5, cutoff=0.6)))[:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown CPUID feature {feature!r}{hint}") from None

    def diff_host(self) -> list[CpuidChange]:
        """Where this table differs from what KVM supports on the host."""
        return compare_entries(self.host, self.entries)

    def diff(self, held: list[CpuidEntry]) -> list[CpuidChange]:
        """Where `held` (KVM_GET_CPUID2's answer, say) differs from this table."""
        return compare_entries(self.entries, held)

    def rows(self) -> list[dict]:
        """One row per leaf/subleaf, for tables and DataFrames."""
        return [{"leaf": e.function, "subleaf": e.index, "eax": e.eax, "ebx": e.ebx,
                 "ecx": e.ecx, "edx": e.edx,
                 "features": " ".join(n for n, (lf, sl, _, _) in FEATURES.items()
                                      if lf == e.function and sl == e.index and self.has(n))}
                for e in self.entries]

    def __str__(self) -> str:
        lines = [f"CPUID model {self.model}: {len(self.entries)} entries, vendor {self.vendor}"]
        for row in self.rows():
            lines.append(f"  {row['leaf']:#010x}.{row['subleaf']:<2} eax={row['eax']:08x} "
                         f"ebx={row['ebx']:08x} ecx={row['ecx']:08x} edx={row['edx']:08x}"
                         + (f"  {row['features']}" if row["features"] else ""))
        return "\n".join(lines)


def compare_entries(before: list[CpuidEntry], after: list[CpuidEntry]) -> list[CpuidChange]:
    """Register by register, where the entries of `after` differ from the same leaf and
    subleaf in `before` (entries only one side has are left out)."""
    old = {(e.function, e.index): e for e in before}
    changes = []
    for entry in after:
        earlier = old.get((entry.function, entry.index))
        if earlier is None:
            continue
        for reg in ("eax", "ebx", "ecx", "edx"):
            if getattr(earlier, reg) != getattr(entry, reg):
                changes.append(CpuidChange(entry.function, entry.index, reg,
                                           getattr(earlier, reg), getattr(entry, reg)))
    return changes
