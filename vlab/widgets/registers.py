"""RegisterView: a vCPU's registers with flags decoded and the last step's changes marked."""
from __future__ import annotations

import ipywidgets as widgets

from ..kvm.state import GPR_NAMES, SEGMENT_NAMES
from ..lab.registers import cpu_mode, describe_segment
from .base import LabView, cell, escape, message, table

CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "efer")
SHOWN = frozenset(GPR_NAMES + ("rip", "rflags") + SEGMENT_NAMES + ("gdt", "idt") + CONTROL_NAMES)


class RegisterView(LabView):
    """GPRs, RIP, RFLAGS, segments, descriptor tables and control registers of one vCPU.

    Every value cell carries `data-reg="<name>"`; the ones the last step or run changed carry
    the class `vlab-changed` and are listed in `highlighted`."""

    def __init__(self, lab, vcpu: int = 0):
        super().__init__(lab)
        self.vcpu = vcpu
        self.html = widgets.HTML()
        self.highlighted: set[str] = set()
        self.children = (self.html,)
        self.refresh()

    def _attach(self) -> bool:
        return self._on_registers(self.vcpu, self.render)

    @property
    def model(self):
        return self.lab.registers[self.vcpu] if len(self.lab.registers) > self.vcpu else None

    def render(self) -> None:
        model = self.model
        if model is None or model.current is None:
            self.highlighted = set()
            self.html.value = message(f"vCPU {self.vcpu}: no registers yet (they exist after "
                                      f"kvm_init_vcpu and are set by kvm_arch_put_registers)")
            return
        snap, changed = model.current, model.changed
        flat = snap.flat()
        # A segment or table row is one line for its selector, base and limit.
        highlighted = {name.split(".")[0] for name in changed} & SHOWN
        decoded = model.decoded()

        def value(name: str, text: str) -> str:
            was = changed.get(name)
            title = f" title='was {was[0]:#x}'" if was else ""
            return cell(text, changed=name in highlighted, attrs=f" data-reg='{name}'{title}")

        def hex64(name: str) -> str:
            return value(name, f"{flat[name]:016x}")

        gprs = [f"<tr>{cell(a, tag='th')}{hex64(a)}{cell(b, tag='th')}{hex64(b)}</tr>"
                for a, b in zip(GPR_NAMES[:8], GPR_NAMES[8:])]
        special = [
            f"<tr>{cell('rip', tag='th')}{hex64('rip')}"
            f"{cell('rflags', tag='th')}{value('rflags', f'{snap.regs.rflags:08x}')}</tr>",
            f"<tr><td colspan=4 style='padding:1px 6px'>flags: "
            f"{escape(' '.join(decoded['rflags']) or '-')}</td></tr>"]
        segments = [f"<tr>{cell(name, tag='th')}"
                    f"{value(name, describe_segment(getattr(snap.sregs, name)))}</tr>"
                    for name in SEGMENT_NAMES]
        for name in ("gdt", "idt"):
            dtable = getattr(snap.sregs, name)
            segments.append(f"<tr>{cell(name, tag='th')}"
                            f"{value(name, f'base={dtable.base:#x} limit={dtable.limit:#x}')}</tr>")
        controls = [f"<tr>{cell(name, tag='th')}{value(name, f'{flat[name]:#x}')}"
                    f"{cell(' '.join(decoded.get(name, [])))}</tr>"
                    for name in CONTROL_NAMES]
        self.highlighted = highlighted
        self.html.value = (
            f"<div class='vlab-registers'>"
            f"<b>vCPU {self.vcpu}</b> in "
            f"<span class='vlab-mode'>{escape(cpu_mode(snap))}</span> mode"
            + table(gprs + special) + table(segments) + table(controls, ("", "value", "bits"))
            + "</div>")

    def summary(self) -> str:
        model = self.model
        if model is None or model.current is None:
            return f"vCPU {self.vcpu}: no registers yet"
        regs = model.current.regs
        changes = ", ".join(f"{k} {a:#x}->{b:#x}" for k, (a, b) in model.changed.items())
        return (f"vCPU {self.vcpu} in {cpu_mode(model.current)} mode: RIP={regs.rip:#x} "
                f"RFLAGS={regs.rflags:#x}; "
                + (f"changed: {changes}" if changes else "nothing changed"))

    def __repr__(self) -> str:
        return f"RegisterView(vcpu={self.vcpu})"
