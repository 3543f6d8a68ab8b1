"""Layer 3: QEMU's bring-up of a KVM guest as steppable stages, and observable models."""
from .cpuid import CPU_MODELS, CpuidFrozen, CpuidTable
from .lab import Lab, Snapshot
from .records import StageRecord
from .registers import RegisterModel
from .stages import STAGES, Stage, StageError

__all__ = ["Lab", "Snapshot", "StageRecord", "RegisterModel", "CpuidTable", "CpuidFrozen",
           "CPU_MODELS", "STAGES", "Stage", "StageError"]
