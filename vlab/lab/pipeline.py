"""The stage pipeline under `vlab.Lab`: QEMU's bring-up as named stages, each run once,
in order, wrapped in a `StageRecord` of the ioctls it issued and the state it changed."""
from __future__ import annotations

import time

from ..kvm.trace import IoctlRecord, Tracer
from ..machine.runloop import Ownership
from .observable import Observable
from .records import StageRecord
from .stages import STAGE_BY_NAME, STAGES, StageError


class LabClosed(StageError):
    """The Lab was closed: its VM and vCPUs are gone."""


def _closed() -> LabClosed:
    return LabClosed("this Lab is closed: its VM and vCPUs are gone; create a new Lab")


class StagePipeline(Observable):
    """Which stages are done, what they provided, and the records they left. A subclass
    gives each stage a method named after it, and `accel` and `_state()` for the records;
    the ioctls of a stage are those its `tracer` saw while the stage ran. A stage, like
    anything that runs a vCPU, holds `ownership` (one caller at a time: another gets
    `VcpuBusy`); after `close()` every stage says the Lab is closed."""

    accel = None

    def __init__(self):
        super().__init__()
        self.records: dict[str, StageRecord] = {}
        self.provided: set[str] = set()
        self.tracer = Tracer()   # this pipeline's ioctls, and only them, go to its records
        self.ownership = Ownership("this Lab", _closed)

    @property
    def closed(self) -> bool:
        return self.ownership.closed

    @property
    def busy(self) -> str | None:
        """What runs the Lab now ("run()", "step()"...), in any thread, or None."""
        return self.ownership.holder

    def _check_open(self) -> None:
        if self.closed:
            raise _closed()

    @property
    def stages(self) -> list[dict]:
        """Every stage with its status: done, next (what `next_stage()` runs) or waiting."""
        rows, nxt = [], self._next_name()
        for stage in STAGES:
            status = "done" if stage.name in self.records else ("next" if stage.name == nxt else "waiting")
            rows.append({"stage": stage.name, "title": stage.title, "status": status})
        return rows

    def _next_name(self) -> str | None:
        return next((s.name for s in STAGES if s.name not in self.records), None)

    def next_stage(self) -> StageRecord:
        """Perform the next stage in QEMU's order."""
        self._check_open()
        name = self._next_name()
        if name is None:
            raise StageError("every stage is done: use lab.run() or lab.step() to go on")
        return getattr(self, name)()

    def bring_up(self) -> list[StageRecord]:
        """Every stage up to (not including) kvm_cpu_exec."""
        self._check_open()
        return [self.next_stage() for s in STAGES[:-1] if s.name not in self.records]

    def _check(self, name: str) -> None:
        self._check_open()
        stage = STAGE_BY_NAME[name]
        if name in self.records and name != "kvm_cpu_exec":
            raise StageError(f"{name} is already done; create a new Lab to start over")
        missing = [need for need in stage.needs if need not in self.provided]
        if missing:
            needed = set(missing)  # and, transitively, what their stages need
            for earlier in reversed(STAGES):
                if needed & set(earlier.provides):
                    needed.update(n for n in earlier.needs if n not in self.provided)
            first = next(s.name for s in STAGES if needed & set(s.provides))
            sources = ", ".join(f"{need} (from {next(s.name for s in STAGES if need in s.provides)})"
                                for need in missing)
            raise StageError(f"{name} needs {sources}: call lab.{first}() first "
                             f"(or lab.next_stage())")

    def _stage(self, name: str, body, ioctl_limit: int | None = None) -> StageRecord:
        with self.ownership.claim(f"{name}()"):
            return self._perform(name, body, ioctl_limit)

    def _perform(self, name: str, body, ioctl_limit: int | None) -> StageRecord:
        self._check(name)
        record = StageRecord(STAGE_BY_NAME[name], self.accel.name if self.accel else "?")
        record.before = self._state()
        calls: list[IoctlRecord] = []

        def keep(call: IoctlRecord) -> None:
            calls.append(call)
            if len(calls) == ioctl_limit:
                unsubscribe()   # the rest only counted (tracer.issued): the run loop may go compiled

        issued = self.tracer.issued
        unsubscribe = self.tracer.subscribe(keep)
        started = time.perf_counter()
        try:
            body(record)
        finally:
            unsubscribe()
        record.seconds = time.perf_counter() - started
        record.ioctls = calls
        counted = self.tracer.issued - issued
        if ioctl_limit is not None and counted > len(calls):
            record.notes.append(f"{counted} ioctls in all; the first {len(calls)} are listed")
        record.accel = self.accel.name if self.accel else "?"
        record.after = self._state()
        self.records[name] = record
        self.provided.update(record.stage.provides)
        self.notify(event="stage", stage=name)
        return record

    def _state(self) -> dict:
        """What the records show before and after a stage."""
        return {}
