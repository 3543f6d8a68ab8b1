"""The KVM userspace ABI (x86-64), declared once: structs, ioctl numbers, constants.

cffi in ABI mode: the structs of `<linux/kvm.h>` and `<asm/kvm.h>` are declared below and the
ioctl numbers are computed from `_IO/_IOR/_IOW/_IOWR(nr, struct)` with `ffi.sizeof`, as
rust-vmm's kvm-ioctls does. The kernel keeps this ABI stable, so a pure-Python install works
on any kernel without compiler or headers; `tests/kvm/test_abi_header.py` compiles a C
program against the real header and checks every size, offset and number declared here.
Each ioctl is commented with the capability that gates it.
"""
from __future__ import annotations

import enum

from cffi import FFI

ffi = FFI()
ffi.cdef("""
struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags;
    uint64_t guest_phys_addr; uint64_t memory_size; uint64_t userspace_addr;
};
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
};
struct kvm_dtable { uint64_t base; uint16_t limit; uint16_t padding[3]; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    uint64_t interrupt_bitmap[4];
};
struct kvm_fpu {
    uint8_t fpr[8][16]; uint16_t fcw, fsw; uint8_t ftwx, pad1; uint16_t last_opcode;
    uint64_t last_ip, last_dp; uint8_t xmm[16][16]; uint32_t mxcsr, pad2;
};
struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };
struct kvm_cpuid_entry2 {
    uint32_t function, index, flags, eax, ebx, ecx, edx; uint32_t padding[3];
};
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; };
struct kvm_guest_debug_arch { uint64_t debugreg[8]; };
struct kvm_guest_debug { uint32_t control; uint32_t pad; struct kvm_guest_debug_arch arch; };
struct kvm_debug_exit_arch { uint32_t exception; uint32_t pad; uint64_t pc, dr6, dr7; };
struct kvm_vcpu_events {
    struct { uint8_t injected, nr, has_error_code, pending; uint32_t error_code; } exception;
    struct { uint8_t injected, nr, soft, shadow; } interrupt;
    struct { uint8_t injected, pending, masked, pad; } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct { uint8_t smm, pending, smm_inside_nmi, latched_init; } smi;
    struct { uint8_t pending; } triple_fault;
    uint8_t reserved[26];
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_debugregs { uint64_t db[4]; uint64_t dr6, dr7, flags; uint64_t reserved[9]; };
struct kvm_xcr { uint32_t xcr; uint32_t reserved; uint64_t value; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; struct kvm_xcr xcrs[16]; uint64_t padding[16]; };
struct kvm_lapic_state { char regs[1024]; };
struct kvm_dirty_log { uint32_t slot; uint32_t padding1; union { void *dirty_bitmap; uint64_t padding2; }; };
struct kvm_irq_level { uint32_t irq; uint32_t level; };
struct kvm_pit_config { uint32_t flags; uint32_t pad[15]; };
struct kvm_enable_cap { uint32_t cap; uint32_t flags; uint64_t args[4]; uint8_t pad[64]; };
struct kvm_msr_filter_range { uint32_t flags; uint32_t nmsrs; uint32_t base; uint8_t *bitmap; };
struct kvm_msr_filter { uint32_t flags; struct kvm_msr_filter_range ranges[16]; };
struct kvm_stats_header {
    uint32_t flags; uint32_t name_size; uint32_t num_desc;
    uint32_t id_offset; uint32_t desc_offset; uint32_t data_offset;
};
struct kvm_stats_desc {
    uint32_t flags; int16_t exponent; uint16_t size; uint32_t offset; uint32_t bucket_size;
    char name[];
};
struct kvm_sync_regs {
    struct kvm_regs regs; struct kvm_sregs sregs; struct kvm_vcpu_events events;
};
struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; } mmio;
        struct { uint64_t nr; uint64_t args[6]; uint64_t ret; uint32_t longmode; uint32_t pad; } hypercall;
        struct { uint64_t rip; uint32_t is_write; uint32_t pad; } tpr_access;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct { uint32_t suberror; uint32_t ndata; uint64_t flags; uint8_t insn_size; uint8_t insn_bytes[15]; } emulation_failure;
        struct { uint32_t type; uint32_t ndata; uint64_t data[16]; } system_event;
        struct { uint8_t vector; } eoi;
        struct { uint8_t error; uint8_t pad[7]; uint32_t reason; uint32_t index; uint64_t data; } msr;
        struct { uint32_t flags; } notify;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union { struct kvm_sync_regs regs; char padding[2048]; } s;
};

int ioctl(int fd, unsigned long request, void *arg);
""")
libc = ffi.dlopen(None)

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, ctype: str | None) -> int:
    size = ffi.sizeof(ctype) if ctype else 0
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr): return _ioc(_IOC_NONE, nr, None)
def _ior(nr, ctype): return _ioc(_IOC_READ, nr, ctype)
def _iow(nr, ctype): return _ioc(_IOC_WRITE, nr, ctype)
def _iowr(nr, ctype): return _ioc(_IOC_READ | _IOC_WRITE, nr, ctype)


class Ioctl(enum.IntEnum):
    """Every ioctl vlab issues, by its kernel name without the `KVM_` prefix."""
    # system fd (/dev/kvm)
    GET_API_VERSION = _io(0x00)
    CREATE_VM = _io(0x01)
    GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
    CHECK_EXTENSION = _io(0x03)
    GET_VCPU_MMAP_SIZE = _io(0x04)
    GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")           # KVM_CAP_EXT_CPUID
    GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, "struct kvm_msr_list")  # KVM_CAP_GET_MSR_FEATURES
    # VM fd
    CREATE_VCPU = _io(0x41)
    GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")
    SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
    SET_TSS_ADDR = _io(0x47)                                         # KVM_CAP_SET_TSS_ADDR
    SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")                   # KVM_CAP_SET_IDENTITY_MAP_ADDR
    CREATE_IRQCHIP = _io(0x60)                                       # KVM_CAP_IRQCHIP
    IRQ_LINE = _iow(0x61, "struct kvm_irq_level")                    # KVM_CAP_IRQCHIP
    CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")                # KVM_CAP_PIT2
    X86_SET_MSR_FILTER = _iow(0xC6, "struct kvm_msr_filter")         # KVM_CAP_X86_MSR_FILTER
    GET_STATS_FD = _io(0xCE)                                         # KVM_CAP_BINARY_STATS_FD (VM and vCPU)
    ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")                 # KVM_CAP_ENABLE_CAP(_VM)
    # vCPU fd
    RUN = _io(0x80)
    GET_REGS = _ior(0x81, "struct kvm_regs")
    SET_REGS = _iow(0x82, "struct kvm_regs")
    GET_SREGS = _ior(0x83, "struct kvm_sregs")
    SET_SREGS = _iow(0x84, "struct kvm_sregs")
    GET_MSRS = _iowr(0x88, "struct kvm_msrs")  # also on the system fd for feature MSRs
    SET_MSRS = _iow(0x89, "struct kvm_msrs")
    GET_FPU = _ior(0x8C, "struct kvm_fpu")
    SET_FPU = _iow(0x8D, "struct kvm_fpu")
    GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")                 # KVM_CAP_IRQCHIP
    SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")                     # KVM_CAP_EXT_CPUID
    GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")                    # KVM_CAP_EXT_CPUID
    GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")                 # KVM_CAP_MP_STATE
    SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")                 # KVM_CAP_MP_STATE
    SET_GUEST_DEBUG = _iow(0x9B, "struct kvm_guest_debug")           # KVM_CAP_SET_GUEST_DEBUG
    GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")           # KVM_CAP_VCPU_EVENTS
    SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")           # KVM_CAP_VCPU_EVENTS
    GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")               # KVM_CAP_DEBUGREGS
    SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")               # KVM_CAP_DEBUGREGS
    SET_TSC_KHZ = _io(0xA2)                                          # KVM_CAP_TSC_CONTROL
    GET_TSC_KHZ = _io(0xA3)                                          # KVM_CAP_GET_TSC_KHZ
    GET_XCRS = _ior(0xA6, "struct kvm_xcrs")                         # KVM_CAP_XCRS
    SET_XCRS = _iow(0xA7, "struct kvm_xcrs")                         # KVM_CAP_XCRS


# The vCPU-fd ENABLE_CAP shares its number with the VM one; GET_MSRS on /dev/kvm reads
# feature MSRs. Python's IntEnum would alias duplicates, so they are looked up by name.
IOCTL_NAMES = {member.value: name for name, member in Ioctl.__members__.items()}

KVM_API_VERSION = 12
KVM_MAX_CPUID_ENTRIES = 256  # QEMU's KVM_MAX_CPUID_ENTRIES; the kernel caps at 256 too
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

KVM_MSR_FILTER_READ = 1 << 0   # a kvm_msr_filter_range's flags: the bitmap filters reads
KVM_MSR_FILTER_WRITE = 1 << 1  # ... and/or writes

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class ExitReason(enum.IntEnum):
    """`KVM_EXIT_*`: why KVM_RUN returned to userspace (every value `<linux/kvm.h>` defines)."""
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    S390_SIEIC = 13
    S390_RESET = 14
    DCR = 15
    NMI = 16
    INTERNAL_ERROR = 17
    OSI = 18
    PAPR_HCALL = 19
    S390_UCONTROL = 20
    WATCHDOG = 21
    S390_TSCH = 22
    EPR = 23
    SYSTEM_EVENT = 24
    S390_STSI = 25
    IOAPIC_EOI = 26
    HYPERV = 27
    ARM_NISV = 28
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    RISCV_SBI = 35
    RISCV_CSR = 36
    NOTIFY = 37


class InternalErrorSuberror(enum.IntEnum):
    """`KVM_INTERNAL_ERROR_*`: what went wrong inside KVM."""
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class SystemEventType(enum.IntEnum):
    """`KVM_SYSTEM_EVENT_*`."""
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class MpState(enum.IntEnum):
    """`KVM_MP_STATE_*` (x86 subset)."""
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


class StatType(enum.IntEnum):
    """`KVM_STATS_TYPE_*` (bits 0-3 of a stats descriptor's flags)."""
    CUMULATIVE = 0
    INSTANT = 1
    PEAK = 2
    LINEAR_HIST = 3
    LOG_HIST = 4


class StatUnit(enum.IntEnum):
    """`KVM_STATS_UNIT_*` (bits 4-7 of the flags, shifted down)."""
    NONE = 0
    BYTES = 1
    SECONDS = 2
    CYCLES = 3
    BOOLEAN = 4


class Cap(enum.IntEnum):
    """`KVM_CAP_*`: every capability `<linux/kvm.h>` names, for KVM_CHECK_EXTENSION."""
    IRQCHIP = 0
    HLT = 1
    MMU_SHADOW_CACHE_CONTROL = 2
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    VAPIC = 6
    EXT_CPUID = 7
    CLOCKSOURCE = 8
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    NOP_IO_DELAY = 12
    PV_MMU = 13
    MP_STATE = 14
    COALESCED_MMIO = 15
    SYNC_MMU = 16
    IOMMU = 18
    DESTROY_MEMORY_REGION_WORKS = 21
    USER_NMI = 22
    SET_GUEST_DEBUG = 23
    REINJECT_CONTROL = 24
    IRQ_ROUTING = 25
    IRQ_INJECT_STATUS = 26
    ASSIGN_DEV_IRQ = 29
    JOIN_MEMORY_REGIONS_WORKS = 30
    MCE = 31
    IRQFD = 32
    PIT2 = 33
    SET_BOOT_CPU_ID = 34
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    XEN_HVM = 38
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    S390_PSW = 42
    PPC_SEGSTATE = 43
    HYPERV = 44
    HYPERV_VAPIC = 45
    HYPERV_SPIN = 46
    PCI_SEGMENT = 47
    PPC_PAIRED_SINGLES = 48
    INTR_SHADOW = 49
    DEBUGREGS = 50
    X86_ROBUST_SINGLESTEP = 51
    PPC_OSI = 52
    PPC_UNSET_IRQ = 53
    ENABLE_CAP = 54
    XSAVE = 55
    XCRS = 56
    PPC_GET_PVINFO = 57
    PPC_IRQ_LEVEL = 58
    ASYNC_PF = 59
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    PPC_BOOKE_SREGS = 62
    SPAPR_TCE = 63
    PPC_SMT = 64
    PPC_RMA = 65
    MAX_VCPUS = 66
    PPC_HIOR = 67
    PPC_PAPR = 68
    SW_TLB = 69
    ONE_REG = 70
    S390_GMAP = 71
    TSC_DEADLINE_TIMER = 72
    S390_UCONTROL = 73
    SYNC_REGS = 74
    PCI_2_3 = 75
    KVMCLOCK_CTRL = 76
    SIGNAL_MSI = 77
    PPC_GET_SMMU_INFO = 78
    S390_COW = 79
    PPC_ALLOC_HTAB = 80
    READONLY_MEM = 81
    IRQFD_RESAMPLE = 82
    PPC_BOOKE_WATCHDOG = 83
    PPC_HTAB_FD = 84
    S390_CSS_SUPPORT = 85
    PPC_EPR = 86
    ARM_PSCI = 87
    ARM_SET_DEVICE_ADDR = 88
    DEVICE_CTRL = 89
    IRQ_MPIC = 90
    PPC_RTAS = 91
    IRQ_XICS = 92
    ARM_EL1_32BIT = 93
    SPAPR_MULTITCE = 94
    EXT_EMUL_CPUID = 95
    HYPERV_TIME = 96
    IOAPIC_POLARITY_IGNORED = 97
    ENABLE_CAP_VM = 98
    S390_IRQCHIP = 99
    IOEVENTFD_NO_LENGTH = 100
    VM_ATTRIBUTES = 101
    ARM_PSCI_0_2 = 102
    PPC_FIXUP_HCALL = 103
    PPC_ENABLE_HCALL = 104
    CHECK_EXTENSION_VM = 105
    S390_USER_SIGP = 106
    S390_VECTOR_REGISTERS = 107
    S390_MEM_OP = 108
    S390_USER_STSI = 109
    S390_SKEYS = 110
    MIPS_FPU = 111
    MIPS_MSA = 112
    S390_INJECT_IRQ = 113
    S390_IRQ_STATE = 114
    PPC_HWRNG = 115
    DISABLE_QUIRKS = 116
    X86_SMM = 117
    MULTI_ADDRESS_SPACE = 118
    GUEST_DEBUG_HW_BPS = 119
    GUEST_DEBUG_HW_WPS = 120
    SPLIT_IRQCHIP = 121
    IOEVENTFD_ANY_LENGTH = 122
    HYPERV_SYNIC = 123
    S390_RI = 124
    SPAPR_TCE_64 = 125
    ARM_PMU_V3 = 126
    VCPU_ATTRIBUTES = 127
    MAX_VCPU_ID = 128
    X2APIC_API = 129
    S390_USER_INSTR0 = 130
    MSI_DEVID = 131
    PPC_HTM = 132
    SPAPR_RESIZE_HPT = 133
    PPC_MMU_RADIX = 134
    PPC_MMU_HASH_V3 = 135
    IMMEDIATE_EXIT = 136
    MIPS_VZ = 137
    MIPS_TE = 138
    MIPS_64BIT = 139
    S390_GS = 140
    S390_AIS = 141
    SPAPR_TCE_VFIO = 142
    X86_DISABLE_EXITS = 143
    ARM_USER_IRQ = 144
    S390_CMMA_MIGRATION = 145
    PPC_FWNMI = 146
    PPC_SMT_POSSIBLE = 147
    HYPERV_SYNIC2 = 148
    HYPERV_VP_INDEX = 149
    S390_AIS_MIGRATION = 150
    PPC_GET_CPU_CHAR = 151
    S390_BPB = 152
    GET_MSR_FEATURES = 153
    HYPERV_EVENTFD = 154
    HYPERV_TLBFLUSH = 155
    S390_HPAGE_1M = 156
    NESTED_STATE = 157
    ARM_INJECT_SERROR_ESR = 158
    MSR_PLATFORM_INFO = 159
    PPC_NESTED_HV = 160
    HYPERV_SEND_IPI = 161
    COALESCED_PIO = 162
    HYPERV_ENLIGHTENED_VMCS = 163
    EXCEPTION_PAYLOAD = 164
    ARM_VM_IPA_SIZE = 165
    MANUAL_DIRTY_LOG_PROTECT = 166
    HYPERV_CPUID = 167
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    PPC_IRQ_XIVE = 169
    ARM_SVE = 170
    ARM_PTRAUTH_ADDRESS = 171
    ARM_PTRAUTH_GENERIC = 172
    PMU_EVENT_FILTER = 173
    ARM_IRQ_LINE_LAYOUT_2 = 174
    HYPERV_DIRECT_TLBFLUSH = 175
    PPC_GUEST_DEBUG_SSTEP = 176
    ARM_NISV_TO_USER = 177
    ARM_INJECT_EXT_DABT = 178
    S390_VCPU_RESETS = 179
    S390_PROTECTED = 180
    PPC_SECURE_GUEST = 181
    HALT_POLL = 182
    ASYNC_PF_INT = 183
    LAST_CPU = 184
    SMALLER_MAXPHYADDR = 185
    S390_DIAG318 = 186
    STEAL_TIME = 187
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    ENFORCE_PV_FEATURE_CPUID = 190
    SYS_HYPERV_CPUID = 191
    DIRTY_LOG_RING = 192
    X86_BUS_LOCK_EXIT = 193
    PPC_DAWR1 = 194
    SET_GUEST_DEBUG2 = 195
    SGX_ATTRIBUTE = 196
    VM_COPY_ENC_CONTEXT_FROM = 197
    PTP_KVM = 198
    HYPERV_ENFORCE_CPUID = 199
    SREGS2 = 200
    EXIT_HYPERCALL = 201
    PPC_RPT_INVALIDATE = 202
    BINARY_STATS_FD = 203
    EXIT_ON_EMULATION_FAILURE = 204
    ARM_MTE = 205
    VM_MOVE_ENC_CONTEXT_FROM = 206
    VM_GPA_BITS = 207
    XSAVE2 = 208
    SYS_ATTRIBUTES = 209
    PPC_AIL_MODE_3 = 210
    S390_MEM_OP_EXTENSION = 211
    PMU_CAPABILITY = 212
    DISABLE_QUIRKS2 = 213
    VM_TSC_CONTROL = 214
    SYSTEM_EVENT_DATA = 215
    ARM_SYSTEM_SUSPEND = 216
    S390_PROTECTED_DUMP = 217
    X86_TRIPLE_FAULT_EVENT = 218
    X86_NOTIFY_VMEXIT = 219
    VM_DISABLE_NX_HUGE_PAGES = 220
    S390_ZPCI_OP = 221
    S390_CPU_TOPOLOGY = 222
    DIRTY_LOG_RING_ACQ_REL = 223
    S390_PROTECTED_ASYNC_DISABLE = 224
    DIRTY_LOG_RING_WITH_BITMAP = 225
    PMU_EVENT_MASKED_EVENTS = 226
    COUNTER_OFFSET = 227
    ARM_EAGER_SPLIT_CHUNK_SIZE = 228
    ARM_SUPPORTED_BLOCK_SIZES = 229
