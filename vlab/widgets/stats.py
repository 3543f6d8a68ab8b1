"""KvmStatsView: every counter of a vCPU's binary stats fd, the ones that moved marked."""
from __future__ import annotations

import ipywidgets as widgets

from .base import LabView, cell, message, table

COLUMNS = 3   # counter groups side by side
_UNREAD = object()


class KvmStatsView(LabView):
    """KVM's own counters for one vCPU (KVM_GET_STATS_FD), read when a step or run ends;
    those that changed since the previous step or run are marked and listed in
    `highlighted`. Histograms show their number of samples."""

    def __init__(self, lab, vcpu: int = 0, live: bool = True):
        super().__init__(lab, live)
        self.vcpu = vcpu
        self.html = widgets.HTML()
        self.children = (self.caption, self.html)
        self.counters: dict[str, int] = {}
        self.previous: dict[str, int] = {}
        self.highlighted: set[str] = set()
        self._read_at: object = _UNREAD   # the register snapshot the counters were read after
        self.refresh()

    def _attach(self) -> bool:
        return self._on_registers(self.vcpu, self.render)

    def _read(self) -> None:
        """Read again only when the vCPU ran since: rendering twice for one step must not
        make its changes look like no change."""
        model = self.lab.registers[self.vcpu] if len(self.lab.registers) > self.vcpu else None
        snapshot = model.current if model else None
        if snapshot is self._read_at:
            return
        self._read_at = snapshot
        raw = self.lab.runners[self.vcpu].kernel_counters()
        counters = {name: sum(v) if isinstance(v, tuple) else v for name, v in raw.items()}
        self.previous, self.counters = (self.counters or counters), counters
        self.highlighted = {n for n, v in counters.items() if self.previous.get(n, v) != v}

    def render(self) -> None:
        if len(self.lab.runners) <= self.vcpu:
            self.html.value = message(f"vCPU {self.vcpu} does not exist yet: "
                                      f"kvm_init_vcpu creates it")
            return
        self._read()
        if not self.counters:
            self.html.value = message("this accelerator has no KVM stats fd")
            return
        names = list(self.counters)
        per_column = -(-len(names) // COLUMNS)
        rows = []
        for r in range(per_column):
            cells = []
            for name in names[r::per_column]:
                changed = name in self.highlighted
                delta = self.counters[name] - self.previous.get(name, self.counters[name])
                cells += [cell(name, changed=changed),
                          cell(f"{self.counters[name]:,}", changed=changed,
                               attrs=f" data-stat='{name}'"),
                          cell(f"{delta:+,}" if delta else "", changed=changed)]
            rows.append("<tr>" + "".join(cells) + "</tr>")
        self.html.value = (message(f"vCPU {self.vcpu}: KVM's counters; marked: changed by the "
                                   f"last step or run") + table(rows))

    def summary(self) -> str:
        if not self.counters:
            return f"vCPU {self.vcpu}: no KVM counters"
        moved = ", ".join(f"{n} {self.counters[n] - self.previous[n]:+}"
                          for n in sorted(self.highlighted))
        return (f"vCPU {self.vcpu}: {len(self.counters)} KVM counters; last step or run moved: "
                f"{moved or 'none'}")

    def __repr__(self) -> str:
        return f"KvmStatsView(vcpu={self.vcpu})"
