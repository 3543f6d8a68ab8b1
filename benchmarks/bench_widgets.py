"""What the widgets cost, in a Python process with no frontend (ipywidgets' DummyComm).

    python benchmarks/bench_widgets.py [--rounds N] [--samples N] [--check]

- refresh after a step: the time from the register model's change (`RegisterModel.update`
  after a single-step) to the views' new state: the RegisterView alone; the views a step
  updates except the histogram (registers, disassembly, memory at RIP, KVM stats); and the
  whole Dashboard, whose histogram redraws too (a step is one more exit). Reference: the
  step itself, `lab.step()` with no view. Targets: 5 ms for the views a step updates,
  25 ms for the whole Dashboard.
- histogram redraw: `ExitHistogram.render()` (HTML bars) after a new exit; target 25 ms.
  Reference: the same two bar charts as a picture, drawn the plain way with matplotlib's
  Agg backend (a new figure, `barh` on default axes, `savefig` to PNG).
- live views during a run: userspace exits/s of a run with the Dashboard attached (histogram
  redrawn every 0.2 s, stats, console) against the same run with no view. Views poll their
  models (vlab.widgets.base.POLLER), so they cost a run their redraws, nothing per exit;
  target: at most 10% fewer exits/s.

The machine is shared and noisy: contenders alternate within each round and every figure is
a median of per-round medians. `--check` exits 1 when a median misses its target.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from matplotlib.figure import Figure  # noqa: E402

from vlab import Lab  # noqa: E402
from vlab.widgets import (Dashboard, Disassembly, ExitHistogram, KvmStatsView,  # noqa: E402
                          MemoryView, RegisterView)

REFRESH_TARGET_MS = 5.0
DASHBOARD_TARGET_MS = 25.0
REDRAW_TARGET_MS = 25.0
LIVE_COST_TARGET = 0.10   # fraction of a run's exits/s the live Dashboard may cost
LOOP = """\
again:
    inc ax
    add bx, ax
    xor cx, bx
    jmp again
"""
OUT_LOOP = "again: out 0x80, al\n jmp again\n"   # one userspace exit per iteration
RUN_EXITS = 100_000   # about a second of guest: the live redraws amortise as they would


def lab_with(source: str) -> Lab:
    lab = Lab(accel="kvm")
    lab.load_assembly(source)
    lab.bring_up()
    return lab


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1e3


def step_then_update(lab: Lab) -> float:
    """ms from the register model's change to the subscribed views' new state."""
    result = lab.runners[0].step()
    return timed(lambda: lab.registers[0].update(result.after))


def histogram_redraw(lab: Lab, histogram: ExitHistogram) -> float:
    lab.runners[0].step()           # one more exit: the picture has changed
    return timed(histogram.render)


def plain_agg_redraw(lab: Lab) -> float:
    """The same two charts drawn the plain way: new figure, default axes, savefig."""
    user = lab.exits().histogram()
    kernel = {n: v for n, v in lab.runners[0].kernel_counters().items()
              if n in lab.exits().counter_names and v}

    def draw() -> None:
        figure = Figure(figsize=(7.5, 2.2), dpi=80)
        for axes, counts in zip(figure.subplots(1, 2), (user, kernel)):
            axes.barh(list(counts), list(counts.values()))
        figure.savefig(io.BytesIO(), format="png")
    return timed(draw)


def run_rate(lab: Lab) -> float:
    result = lab.run(max_exits=RUN_EXITS)
    return result.exits / result.seconds


def median_of_rounds(rounds: list[list[float]]) -> float:
    return statistics.median(statistics.median(r) for r in rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if refresh > {REFRESH_TARGET_MS} ms, the whole Dashboard "
                             f"> {DASHBOARD_TARGET_MS} ms, redraw > {REDRAW_TARGET_MS} ms or the "
                             f"live Dashboard costs a run more than {LIVE_COST_TARGET:.0%}")
    args = parser.parse_args()

    bare, registers_only, step_views, charts, whole = (lab_with(LOOP) for _ in range(5))
    RegisterView(registers_only)
    whole_dashboard = Dashboard(whole)
    views = [RegisterView(step_views), Disassembly(step_views),
             MemoryView(step_views, follow_rip=True), KvmStatsView(step_views)]
    histogram = ExitHistogram(charts, live=False)   # drawn only by the timed render()
    quiet, watched = lab_with(OUT_LOOP), lab_with(OUT_LOOP)
    dashboard = Dashboard(watched)

    contenders = {
        "lab.step(), no view (reference)": lambda: timed(bare.step),
        "refresh: RegisterView": lambda: step_then_update(registers_only),
        "refresh: views a step updates": lambda: step_then_update(step_views),
        "refresh: whole Dashboard": lambda: step_then_update(whole),
        "histogram redraw (ExitHistogram)": lambda: histogram_redraw(charts, histogram),
        "plain matplotlib Agg redraw (reference)": lambda: plain_agg_redraw(charts),
    }
    results: dict[str, list[list[float]]] = {name: [] for name in contenders}
    rates: dict[str, list[float]] = {"run, no view": [], "run, Dashboard attached": []}
    order = list(contenders)
    for _ in range(args.rounds):
        for name in order:
            results[name].append([contenders[name]() for _ in range(args.samples)])
        rates["run, no view"].append(run_rate(quiet))
        rates["run, Dashboard attached"].append(run_rate(watched))
        order.reverse()

    medians = {name: median_of_rounds(rounds) for name, rounds in results.items()}
    width = max(map(len, medians))
    print(f"{args.rounds} rounds x {args.samples} samples; medians of per-round medians")
    for name, value in medians.items():
        print(f"  {name:<{width}}  {value:8.3f} ms")
    redraw = medians["histogram redraw (ExitHistogram)"]
    print(f"  histogram redraw / plain Agg redraw: "
          f"{redraw / medians['plain matplotlib Agg redraw (reference)']:.2g}")
    rate = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in rate.items():
        print(f"  {name:<{width}}  {value:8,.0f} exits/s")
    live_cost = 1 - rate["run, Dashboard attached"] / rate["run, no view"]
    print(f"  live-view cost to the guest: {live_cost:.1%} fewer exits/s "
          f"(target <= {LIVE_COST_TARGET:.0%})")

    for lab in (bare, registers_only, step_views, charts, whole, quiet, watched):
        lab.close()
    dashboard.close()
    whole_dashboard.close()
    for view in views + [histogram]:
        view.close()
    missed = (medians["refresh: views a step updates"] > REFRESH_TARGET_MS
              or medians["refresh: whole Dashboard"] > DASHBOARD_TARGET_MS
              or redraw > REDRAW_TARGET_MS or live_cost > LIVE_COST_TARGET)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
