"""Layer 1: the kernel's KVM API from Python, one class per fd.

    Kvm (/dev/kvm)  ->  VmFd (KVM_CREATE_VM)  ->  VcpuFd (KVM_CREATE_VCPU, kvm_run mmap)

One method per ioctl, named after it without `KVM_`; every call passes through
`vlab.kvm.trace.ioctl`, which records it and turns errno into a `KvmError` naming the ioctl.
"""
from .abi import Cap, ExitReason, Ioctl, MpState
from .backend import Backend, detect as detect_backend
from .errors import KvmError, KvmUnavailable, VmLimitReached
from .exits import (Debug, Exception_, Exit, ExitDecodeError, FailEntry, Hlt, Hypercall,
                    InternalError, Interrupted, IoIn, OtherExit, IoOut, MmioRead, MmioWrite, Shutdown,
                    SystemEvent, Unknown, X86Rdmsr, X86Wrmsr, decode)
from .convert import host_address
from .kernel_trace import KernelTrace, KernelTraceUnavailable, kernel_trace_usable
from .state import CpuidEntry, DebugRegs, DTable, Regs, Segment, Sregs
from .stats import StatDescriptor, StatsFd
from .system import DEV_KVM, Kvm, kvm_usable
from .trace import IoctlRecord, Tracer
from .vcpu import VcpuFd
from .vm import VmFd

__all__ = [
    "Cap", "ExitReason", "Ioctl", "MpState", "Backend", "detect_backend", "KvmError",
    "KvmUnavailable", "Debug", "Exception_", "Exit", "ExitDecodeError", "FailEntry", "Hlt",
    "Hypercall", "InternalError", "Interrupted", "IoIn", "OtherExit", "IoOut", "MmioRead", "MmioWrite",
    "Shutdown", "SystemEvent", "Unknown", "X86Rdmsr", "X86Wrmsr", "decode", "CpuidEntry",
    "DebugRegs", "DTable", "Regs", "Segment", "Sregs", "StatDescriptor", "StatsFd", "DEV_KVM",
    "Kvm", "kvm_usable", "IoctlRecord", "Tracer", "VcpuFd", "VmFd", "host_address",
    "KernelTrace", "KernelTraceUnavailable", "kernel_trace_usable", "VmLimitReached",
]
