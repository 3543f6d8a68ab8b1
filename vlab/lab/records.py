"""What a stage did: the QEMU function it mirrors, every ioctl, and the state it changed.

The seed document's gdb backtraces are the model: which QEMU function, what it asked the
kernel, what came back. Records print as text (terminals, nbval) and as HTML in notebooks.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field

from ..kvm.trace import IoctlRecord
from .stages import Stage


@dataclass
class StageRecord:
    stage: Stage
    accel: str
    ioctls: list[IoctlRecord] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)     # what tcg did in place of ioctls
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.stage.name

    def ioctl_names(self) -> list[str]:
        return [f"KVM_{r.name}" for r in self.ioctls]

    def changes(self) -> dict[str, tuple[object, object]]:
        keys = list(dict.fromkeys([*self.before, *self.after]))
        return {k: (self.before.get(k), self.after.get(k)) for k in keys
                if self.before.get(k) != self.after.get(k)}

    def _actions_heading(self) -> str:
        return ("in place of ioctls (software accelerator)" if self.accel == "tcg"
                else "other system calls")

    def rows(self) -> list[dict]:
        """The ioctl table: one row per call, in QEMU's trace-event vocabulary."""
        return [{"event": r.trace_event, "fd": r.fd_kind if r.vcpu_id is None else f"vcpu{r.vcpu_id}",
                 "ioctl": f"KVM_{r.name}", "args": r.args,
                 "result": r.result if r.errno is None else f"errno {r.errno}",
                 "us": round(r.duration_s * 1e6, 1)} for r in self.ioctls]

    def __str__(self) -> str:
        s = self.stage
        lines = [f"== {s.name} ({s.title}) on {self.accel} ==",
                 f"QEMU: {s.name} in {s.qemu_file}; QEMU 5.0: {s.qemu50}",
                 f"kernel: {s.kernel}"]
        if s.qom:
            lines.append("QOM on the way:")
            lines += [f"  - {step}" for step in s.qom]
        if self.ioctls:
            lines.append(f"ioctls ({len(self.ioctls)}):")
            lines += [f"  {r}" for r in self.ioctls]
        if self.actions:
            lines.append(self._actions_heading() + ":")
            lines += [f"  - {a}" for a in self.actions]
        changes = self.changes()
        if changes:
            lines.append("state changed:")
            lines += [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        s = self.stage
        e = html.escape
        parts = [f"<div class='vlab-stage'><h4>{e(s.name)} <small>({e(s.title)}, {e(self.accel)})</small></h4>",
                 f"<p><b>QEMU</b>: <code>{e(s.name)}</code> in <code>{e(s.qemu_file)}</code> "
                 f"(QEMU 5.0: {e(s.qemu50)})<br><b>kernel</b>: <code>{e(s.kernel)}</code></p>"]
        if s.qom:
            parts.append("<details><summary>QOM on the way</summary><ul>"
                         + "".join(f"<li>{e(q)}</li>" for q in s.qom) + "</ul></details>")
        if self.ioctls:
            head = "".join(f"<th>{h}</th>" for h in ("event", "fd", "ioctl", "args", "result", "µs"))
            body = "".join("<tr>" + "".join(f"<td><code>{e(str(v))}</code></td>" for v in row.values())
                           + "</tr>" for row in self.rows())
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        if self.actions:
            parts.append(f"<p>{self._actions_heading()}:</p><ul>"
                         + "".join(f"<li>{e(a)}</li>" for a in self.actions) + "</ul>")
        changes = self.changes()
        if changes:
            parts.append("<p>state changed:</p><ul>" + "".join(
                f"<li><code>{e(k)}</code>: {e(repr(a))} → {e(repr(b))}</li>"
                for k, (a, b) in changes.items()) + "</ul>")
        parts += [f"<p><i>{e(n)}</i></p>" for n in self.notes]
        return "".join(parts) + "</div>"
