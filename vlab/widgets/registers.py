"""RegisterView: a vCPU's registers with flags decoded and the last step's changes marked."""
from __future__ import annotations

import ipywidgets as widgets

from ..kvm.state import GPR_NAMES, SEGMENT_NAMES
from ..lab.registers import cpu_mode, segment_type
from .base import LabView, cell, escape, message, table

CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "efer")
SHOWN = frozenset(GPR_NAMES + ("rip", "rflags") + SEGMENT_NAMES + ("gdt", "idt") + CONTROL_NAMES)


class RegisterView(LabView):
    """GPRs, RIP, RFLAGS, control registers, segments and descriptor tables of one vCPU.

    Every value cell carries `data-reg="<name>"`; the ones the last step or run changed carry
    the class `vlab-changed` and are listed in `highlighted`."""

    def __init__(self, lab, vcpu: int = 0, live: bool = True):
        super().__init__(lab, live)
        self.vcpu = vcpu
        self.html = widgets.HTML()
        self.highlighted: set[str] = set()
        self.children = (self.caption, self.html)
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
        gprs += [
            f"<tr>{cell('rip', tag='th')}{hex64('rip')}"
            f"{cell('rflags', tag='th')}{value('rflags', f'{snap.regs.rflags:08x}')}</tr>",
            f"<tr><td colspan=4 style='padding:1px 6px'>flags: "
            f"{escape(' '.join(decoded['rflags']) or '-')}</td></tr>"]
        # One row per segment, its fields in columns, so no row wraps.
        segments = []
        for name in SEGMENT_NAMES + ("gdt", "idt"):
            segment = getattr(snap.sregs, name)
            is_segment = name in SEGMENT_NAMES
            first = f"{segment.selector:#06x}" if is_segment else ""
            fields = (f"{segment.base:#x}", f"{segment.limit:#x}",
                      segment_type(segment) if is_segment else "")
            segments.append(f"<tr>{cell(name, tag='th')}{value(name, first)}"
                            + "".join(cell(f, changed=name in highlighted) for f in fields)
                            + "</tr>")
        controls = [f"<tr>{cell(name, tag='th')}{value(name, f'{flat[name]:#x}')}"
                    f"{cell(' '.join(decoded.get(name, [])))}</tr>"
                    for name in CONTROL_NAMES]
        self.highlighted = highlighted
        self.html.value = (
            f"<div class='vlab-registers' style='line-height:16px'>"
            f"<b>vCPU {self.vcpu}</b> in "
            f"<span class='vlab-mode'>{escape(cpu_mode(snap))}</span> mode"
            "<div style='display:flex;gap:16px;align-items:flex-start'>"
            + table(gprs) + table(controls, ("", "value", "bits")) + "</div>"
            + table(segments, ("", "selector", "base", "limit", "type")) + "</div>")

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
