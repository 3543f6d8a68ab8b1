"""Dashboard: every view of one Lab on one screen, refreshed after each stepper action."""
from __future__ import annotations

import ipywidgets as widgets

from .base import LabView
from .console import SerialConsole
from .cpuid import CpuidExplorer
from .disassembly import Disassembly
from .histogram import ExitHistogram
from .memory import MemoryView
from .registers import RegisterView
from .stats import KvmStatsView
from .stepper import StageStepper


class Dashboard(LabView):
    """The stepper on top; registers beside disassembly, exit histogram and console (the
    three fit a 1440x1000 window together); memory at RIP, CPUID and KVM's counters in tabs.
    Every view in it is live. Stages make models appear (the first vCPU, the
    CPUID table, guest memory), so after each Lab event every view attaches to what is new;
    the models then tell each view when to redraw."""

    def __init__(self, lab, vcpu: int = 0):
        super().__init__(lab)
        self.stepper = StageStepper(lab, vcpu)
        self.registers = RegisterView(lab, vcpu)
        self.disassembly = Disassembly(lab, vcpu)
        self.histogram = ExitHistogram(lab, vcpu)
        self.console = SerialConsole(lab)
        self.memory = MemoryView(lab, follow_rip=True, vcpu=vcpu)
        self.cpuid = CpuidExplorer(lab)
        self.stats = KvmStatsView(lab, vcpu)
        self.views = (self.stepper, self.registers, self.disassembly, self.histogram, self.console,
                      self.memory, self.cpuid, self.stats)
        tabs = widgets.Tab(children=(self.memory, self.cpuid, self.stats),
                           titles=("memory at RIP", "CPUID", "KVM stats"))
        right = widgets.VBox((self.disassembly, self.histogram, self.console), layout=widgets.Layout(
            flex="1 1 auto", min_width="0", margin="0 0 0 16px"))
        self.registers.layout.flex = "0 0 auto"   # as wide as its rows, which never wrap
        # One caption for all: every view here is live (its own caption would repeat it).
        for view in self.views:
            view.caption.layout.display = "none"
        self.children = (self.caption, self.stepper, widgets.HBox((self.registers, right)), tabs)
        # Whatever drives the Lab (these buttons, or lab.next_stage() typed in a cell), the
        # Lab says so, and every view refreshes and attaches to what is new.
        self._unsubscribe_lab = lab.subscribe(lambda _lab, **event: self.on_lab_event())

    def render(self) -> None:
        for view in self.views:
            view.refresh()

    def on_lab_event(self) -> None:
        for view in self.views:
            view.on_lab_event()

    def close(self) -> None:
        self._unsubscribe_lab()
        for view in self.views:
            view.close()
        super().close()

    def summary(self) -> str:
        return "\n\n".join(f"[{type(view).__name__}]\n{view.summary()}" for view in self.views)

    def __repr__(self) -> str:
        return "Dashboard()"
