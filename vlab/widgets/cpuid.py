"""CpuidExplorer: the CPU model's CPUID table, editable until KVM_SET_CPUID2 takes it."""
from __future__ import annotations

import ipywidgets as widgets

from ..lab.cpuid import FEATURES, CpuidFrozen
from .base import LabView, cell, escape, message, table

REGISTERS = ("eax", "ebx", "ecx", "edx")


class CpuidExplorer(LabView):
    """Every leaf with its registers and named features (rows differing from what KVM
    supports on the host are marked), a feature toggle that edits the model
    (`CpuidTable.set_feature`, as `-cpu host,-lm` would) and the diff against the host.
    Once kvm_arch_init_vcpu has handed the table to KVM the toggle is disabled."""

    def __init__(self, lab, feature: str = "lm"):
        super().__init__(lab)
        self.feature = widgets.Dropdown(description="feature", options=[feature], value=feature,
                                        layout=widgets.Layout(width="260px"))
        self.enabled = widgets.Checkbox(description="enabled", indent=False)
        self.status = widgets.HTML()
        self.table_html = widgets.HTML()
        self.children = (widgets.HBox((self.feature, self.enabled)), self.status,
                         widgets.Box((self.table_html,), layout=widgets.Layout(
                             max_height="320px", overflow="auto")))
        self.feature.observe(lambda change: self.render(), "value")
        self.enabled.observe(self._toggle, "value")
        self._rendering = False
        self.refresh()

    @property
    def model(self):
        return self.lab.cpuid

    def _attach(self) -> bool:
        if self.model is None:
            return False
        self._detachers.append(self.model.subscribe(lambda model, **change: self.render()))
        names = sorted(n for n, (leaf, subleaf, _, _) in FEATURES.items()
                       if self.model.find(leaf, subleaf) is not None)
        keep = self.feature.value if self.feature.value in names else names[0]
        with self.feature.hold_sync():
            self.feature.options = names
            self.feature.value = keep
        return True

    def _toggle(self, change) -> None:
        if self._rendering or self.model is None:
            return
        try:
            self.model.set_feature(self.feature.value, change["new"])
        except (CpuidFrozen, KeyError) as e:
            self.render()   # put the checkbox back to what the table says
            self.status.value = message(str(e), "error")

    def render(self) -> None:
        model = self.model
        if model is None:
            self.enabled.disabled = self.feature.disabled = True
            self.status.value = message("no CPU model yet: x86_cpu_realizefn builds the table")
            self.table_html.value = ""
            return
        self._rendering = True
        try:
            with self.enabled.hold_sync():
                self.enabled.value = model.has(self.feature.value)
                self.enabled.disabled = model.frozen
        finally:
            self._rendering = False
        self.feature.disabled = model.frozen
        changes = model.diff_host()
        self.status.value = message(self._state_line(changes))
        differs = {(c.leaf, c.subleaf) for c in changes}
        rows = ["<tr>" + cell(f"{r['leaf']:#010x}", changed=(r["leaf"], r["subleaf"]) in differs)
                + cell(r["subleaf"]) + "".join(cell(f"{r[reg]:08x}") for reg in REGISTERS)
                + cell(r["features"]) + "</tr>" for r in model.rows()]
        listed = "".join(f"<li><code>{c.leaf:#x}.{c.subleaf} {c.register}</code>: "
                         f"{escape(' '.join(c.features))}</li>" for c in changes)
        self.table_html.value = (
            (f"<div>differs from the host (KVM_GET_SUPPORTED_CPUID):<ul>{listed}</ul></div>"
             if listed else "<div>same as the host (KVM_GET_SUPPORTED_CPUID)</div>")
            + table(rows, ("leaf", "sub", *REGISTERS, "features")))

    def _state_line(self, changes) -> str:
        model = self.model
        state = ("frozen: given to the vCPU with KVM_SET_CPUID2 (kvm_arch_init_vcpu)"
                 if model.frozen else "editable until kvm_arch_init_vcpu")
        return (f"CPU model {model.model}: {len(model.entries)} entries, vendor {model.vendor}; "
                f"{len(changes)} registers differ from the host; {state}")

    def summary(self) -> str:
        model = self.model
        if model is None:
            return "no CPU model yet"
        changes = model.diff_host()
        changed = [f for c in changes for f in c.features]
        return self._state_line(changes) + (f"\nchanged: {' '.join(changed)}" if changed else "")

    def __repr__(self) -> str:
        return "CpuidExplorer()"
