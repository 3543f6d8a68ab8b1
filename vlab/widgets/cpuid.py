"""CpuidExplorer: the CPU model's CPUID table, editable until KVM_SET_CPUID2 takes it."""
from __future__ import annotations

import ipywidgets as widgets

from ..lab.cpuid import FEATURES, CpuidFrozen
from .base import LabView, cell, escape, message, table

REGISTERS = ("eax", "ebx", "ecx", "edx")
SELECTED_STYLE = "outline:2px solid #0b5394"


class CpuidExplorer(LabView):
    """Every leaf with its registers and named features (rows differing from what KVM
    supports on the host are marked, and listed first with the chosen feature's row, so an
    edit stays in sight), a feature toggle that edits the model (`CpuidTable.set_feature`,
    as `-cpu host,-lm` would) and the diff against the host.

    Once kvm_arch_init_vcpu has handed the table to KVM it cannot change (QEMU too fixes it
    there): a toggle then collects the edit, and "new Lab" makes a fresh Lab with this one's
    options, brought up to x86_cpu_realizefn with the edits applied (`new_lab`)."""

    def __init__(self, lab, feature: str = "lm"):
        super().__init__(lab)
        self.feature = widgets.Dropdown(description="feature", options=[feature], value=feature,
                                        layout=widgets.Layout(width="260px"))
        self.enabled = widgets.Checkbox(description="enabled", indent=False)
        self.new_lab_button = widgets.Button(
            tooltip="a fresh Lab with this one's options and these CPUID edits",
            layout=widgets.Layout(display="none", width="auto"))
        self.new_lab_button.on_click(lambda _: self.make_new_lab())
        self.status = widgets.HTML()
        self.table_html = widgets.HTML()
        self.children = (widgets.HBox((self.feature, self.enabled, self.new_lab_button)),
                         self.status, widgets.Box((self.table_html,), layout=widgets.Layout(
                             max_height="320px", overflow="auto")))
        self.edits: dict[str, bool] = {}   # wanted after the table froze, for a new Lab
        self.new_lab = None
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
        name, wanted = self.feature.value, change["new"]
        if self.model.frozen:
            if wanted == self.model.has(name):
                self.edits.pop(name, None)
            else:
                self.edits[name] = wanted
            self.render()
            return
        try:
            self.model.set_feature(name, wanted)
        except (CpuidFrozen, KeyError) as e:
            self.render()   # put the checkbox back to what the table says
            self.status.value = message(str(e), "error")

    @property
    def edit_text(self) -> str:
        """The edits as QEMU's -cpu writes them: "-lm,+avx"."""
        return ",".join(("+" if on else "-") + name for name, on in self.edits.items())

    def make_new_lab(self):
        """A fresh Lab with this one's options, brought up to x86_cpu_realizefn (the stage
        that makes the CPUID table) and given the edits; this Lab stays as it is."""
        lab = self.lab
        try:
            new = type(lab)(accel=lab.accel_choice, memory=lab.memory_size, cpu=lab.cpu_model,
                            vcpus=lab.nr_vcpus, mode=lab.mode, irqchip=lab.irqchip,
                            kernel_trace=lab.kernel_trace_requested)
            while new.cpuid is None:
                new.next_stage()
            for name, on in self.edits.items():
                new.cpuid.set_feature(name, on)
        except Exception as e:  # shown to the learner, who clicked and expects an answer
            self.status.value = message(f"no new Lab: {type(e).__name__}: {e}", "error")
            return None
        self.new_lab = new
        self.status.value = message(
            f"made a new Lab with this one's options (cpu {lab.cpu_model}, accel, memory, "
            f"vCPUs, mode), brought up to x86_cpu_realizefn and its CPUID edited: "
            f"{self.edit_text}. It is this view's new_lab (Dashboard(explorer.new_lab) shows "
            f"it); its table stays editable until its kvm_arch_init_vcpu. This Lab is unchanged.")
        return new

    def render(self) -> None:
        model = self.model
        if model is None:
            self.enabled.disabled = self.feature.disabled = True
            self.status.value = message("no CPU model yet: x86_cpu_realizefn builds the table")
            self.table_html.value = ""
            return
        name = self.feature.value
        self.enabled.disabled = self.feature.disabled = False
        self._rendering = True
        try:
            with self.enabled.hold_sync():
                self.enabled.value = self.edits.get(name, model.has(name))
        finally:
            self._rendering = False
        self.new_lab_button.description = f"new Lab with {self.edit_text}"
        self.new_lab_button.layout.display = "" if self.edits else "none"
        changes = model.diff_host()
        self.status.value = message(self._state_line(changes))
        differs = {(c.leaf, c.subleaf) for c in changes}
        leaf, subleaf, _, _ = FEATURES[name]
        selected = model.find(leaf, subleaf)
        selected = (selected.function, selected.index) if selected else None

        def row(r) -> str:
            key = (r["leaf"], r["subleaf"])
            attrs = (f" class='vlab-selected' style='{SELECTED_STYLE}'" if key == selected
                     else "")
            return (f"<tr{attrs}>" + cell(f"{r['leaf']:#010x}", changed=key in differs)
                    + cell(r["subleaf"]) + "".join(cell(f"{r[reg]:08x}") for reg in REGISTERS)
                    + cell(r["features"]) + "</tr>")
        # changed rows, then the chosen feature's, first: in sight without scrolling the leaves
        rows = sorted(model.rows(), key=lambda r: ((r["leaf"], r["subleaf"]) not in differs,
                                                   (r["leaf"], r["subleaf"]) != selected))
        listed = "".join(f"<li><code>{c.leaf:#x}.{c.subleaf} {c.register}</code>: "
                         f"{escape(' '.join(c.features))}</li>" for c in changes)
        self.table_html.value = (
            (f"<div>differs from the host (KVM_GET_SUPPORTED_CPUID):<ul>{listed}</ul></div>"
             if listed else "<div>same as the host (KVM_GET_SUPPORTED_CPUID)</div>")
            + table([row(r) for r in rows], ("leaf", "sub", *REGISTERS, "features")))

    def _state_line(self, changes) -> str:
        model = self.model
        if not model.frozen:
            state = "editable until kvm_arch_init_vcpu"
        elif self.edits:
            state = (f"frozen by KVM_SET_CPUID2 (kvm_arch_init_vcpu): {self.edit_text} needs a "
                     "new Lab (the button makes one)")
        else:
            state = "frozen: given to the vCPU with KVM_SET_CPUID2 (kvm_arch_init_vcpu)"
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
