"""Layer 4: ipywidgets views over a Lab's models (the only package importing ipywidgets).
The state lives in the models; a view keeps only what it displays (and
KvmStatsView the previous counter reading it marks changes against). Each view has a
`summary()` text, printed beside it in notebooks because nbval compares text only, and a
short stable repr for the widget's text/plain output. A view follows the Lab (live) unless
made with `live=False` (as at its cell); its caption says which.

    from vlab.widgets import Dashboard
    Dashboard(lab)
"""
from .console import SerialConsole
from .cpuid import CpuidExplorer
from .dashboard import Dashboard
from .disassembly import Disassembly, code_bits
from .histogram import ExitHistogram
from .kernel_trace import KernelExitTable, KvmRunTimeline
from .memory import MemoryView, hexdump
from .registers import RegisterView
from .stats import KvmStatsView
from .stepper import StageStepper

__all__ = ["Dashboard", "StageStepper", "RegisterView", "ExitHistogram", "CpuidExplorer",
           "MemoryView", "Disassembly", "SerialConsole", "KvmStatsView", "KernelExitTable",
           "KvmRunTimeline", "code_bits", "hexdump"]
