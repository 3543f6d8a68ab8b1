"""Layer 1': accelerators, as QEMU's `-accel`: `kvm` (the kernel) or `tcg` (Unicorn).

`select("auto")` picks kvm when /dev/kvm is usable and falls back to tcg otherwise, saying
why, as QEMU falls back from KVM to TCG.
"""
from __future__ import annotations

from .base import Accelerator, AccelVcpu, AccelVm

ACCELERATORS = ("kvm", "tcg")


def explain_auto() -> tuple[str, str]:
    """Which accelerator `auto` would pick here, and why."""
    from ..kvm import kvm_usable
    usable, why = kvm_usable()
    if usable:
        return "kvm", f"auto: kvm, because {why}"
    return "tcg", f"auto: tcg (software emulation), because KVM is not usable: {why}"


def select(accel: str = "auto", tracer=None) -> Accelerator:
    """Open the accelerator named `accel` ("kvm", "tcg" or "auto"); a kvm accelerator's
    ioctls go to `tracer` (a `vlab.kvm.Tracer`; a new one when None)."""
    if accel == "auto":
        accel, reason = explain_auto()
    elif accel in ACCELERATORS:
        reason = f"asked for {accel}"
    else:
        raise ValueError(f"unknown accelerator {accel!r}; choose one of kvm, tcg, auto")
    if accel == "kvm":
        from .kvm import KvmAccelerator
        return KvmAccelerator(reason, tracer=tracer)
    from .tcg import TcgAccelerator
    return TcgAccelerator(reason)


__all__ = ["Accelerator", "AccelVcpu", "AccelVm", "select", "explain_auto", "ACCELERATORS"]
