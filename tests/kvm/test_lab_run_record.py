"""The kvm_cpu_exec stage's record of a long first run: the first RUN_RECORD_LIMIT ioctls
kept, every one counted, and the rest of the run in the compiled loop once the record has
kept its share."""
from __future__ import annotations

import pytest

from vlab.kvm import Hlt
from vlab.lab.lab import RUN_RECORD_LIMIT
from vlab.machine import runloop

pytestmark = pytest.mark.kvm

EXITS = 3000
GUEST = f"""
    mov cx, {EXITS}
again:
    out 0x80, al
    loop again
    hlt
"""


def first_run(lab, listener=None):
    """Bring the Lab up and run it (the kvm_cpu_exec stage), `listener` hearing the run's
    ioctls; count the records the compiled loop appended."""
    lab.load_assembly(GUEST)
    lab.bring_up()
    if listener is not None:
        lab.tracer.subscribe(listener)
    runner = lab.runners[0]
    compiled = []
    run_compiled = runner._run_compiled

    def counted(exit):
        before = runner.log.total
        try:
            return run_compiled(exit)
        finally:
            compiled.append(runner.log.total - before)

    runner._run_compiled = counted
    result = lab.run()
    assert isinstance(result.last_exit, Hlt) and result.exits == EXITS + 1
    return lab.records["kvm_cpu_exec"], compiled


def summary(call) -> tuple:
    return call.fd_kind, call.name, call.args, call.errno, call.vcpu_id


def stage_calls(heard: list, record) -> list:
    """The stage's own ioctls among those heard: after the state read before it (the first
    RUN begins the run), before the same read after it; the record says how many."""
    start = [c.name for c in heard].index("RUN")
    count = int(next(n for n in record.notes if n.endswith("are listed")).split()[0])
    state = [c.name for c in heard[:start]]
    assert state and [c.name for c in heard[start + count:]] == state
    return heard[start:start + count]


def test_first_run_counts_every_ioctl_keeps_the_first_and_runs_the_rest_compiled(make_lab):
    # the reference: a listener that hears every ioctl keeps the whole run in Python
    reference = make_lab()
    heard = []
    record, compiled = first_run(reference, heard.append)
    assert compiled == [] and reference.runners[0].log.total == EXITS + 1
    calls = stage_calls(heard, record)
    assert [c.name for c in calls].count("RUN") == EXITS + 1
    assert record.ioctls == calls[:RUN_RECORD_LIMIT]

    lab = make_lab()
    record, compiled = first_run(lab)
    assert [summary(c) for c in record.ioctls] == [summary(c) for c in calls[:RUN_RECORD_LIMIT]]
    assert f"{len(calls)} ioctls in all; the first {RUN_RECORD_LIMIT} are listed" in record.notes
    assert lab.runners[0].log.histogram() == reference.runners[0].log.histogram()
    if runloop._runloop is None:
        assert compiled == []   # the Python loop ran it all, counting past the kept calls
        pytest.skip("vlab.machine._runloop is not built here: no compiled loop to hand over to")
    # the Python loop ran until the record was full (no more KVM_RUNs than kept ioctls)...
    python_exits = EXITS + 1 - sum(compiled)
    assert len(compiled) == 1 and 0 < python_exits <= RUN_RECORD_LIMIT
    # ...and later runs take the compiled loop from the start
    assert lab.runners[0].loop == "compiled"


def test_a_listener_that_stays_keeps_the_run_in_python(make_lab):
    lab = make_lab()
    heard = []
    record, compiled = first_run(lab, heard.append)
    assert compiled == [] and lab.runners[0].loop == "python"
    calls = stage_calls(heard, record)
    assert [c.name for c in calls].count("RUN") == EXITS + 1
    assert record.ioctls == calls[:RUN_RECORD_LIMIT]
