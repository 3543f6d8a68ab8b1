"""The checks of the graded exercises (`exercises/`): each runs the student's code against
real KVM (tcg where there is none) and answers with what happened and what to change,
raising `CheckFailed` (shown as its feedback, without a traceback) when the code is not
right yet."""
from .cpu_modes import check_long_mode, check_protected_mode
from .cpuid import check_cpuid
from .exit_count import check_count_exits, check_prediction
from .feedback import CheckFailed
from .port_device import check_device, check_wired_device
from .rom import check_rom
from .run_loop import check_run_loop

__all__ = ["CheckFailed", "check_run_loop", "check_protected_mode", "check_long_mode",
           "check_cpuid", "check_rom", "check_device", "check_wired_device",
           "check_count_exits", "check_prediction"]
