"""notebooks/01-accel-init.ipynb in JupyterLab: its StageStepper appears after kvm_init,
before any vCPU exists. Only "next stage" can work then: step, run and run to next exit
are disabled and look it, and stop is not a live red. A screenshot lands in artifacts/."""
from __future__ import annotations

import re

from playwright.sync_api import expect

NOTEBOOK = "01-accel-init.ipynb"
RENDER_TIMEOUT = 120_000   # ms: kernel start and the lesson's cells
DANGER_RED = "rgb(211, 47, 47)"   # JupyterLab's --jp-error-color1, a "danger" button's colour


def test_stepper_before_a_vcpu_offers_only_next_stage(jupyterlab, page, artifacts):
    page.goto(f"{jupyterlab.url}/lab/tree/{NOTEBOOK}")
    page.get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=RENDER_TIMEOUT)
    page.locator(".lm-MenuBar-item", has_text=re.compile("^Run$")).click()
    page.locator(".lm-Menu-item", has_text=re.compile("^Run All Cells")).click()
    stepper = page.locator(".vlab-stagestepper").first
    stepper.wait_for(timeout=RENDER_TIMEOUT)
    stepper.scroll_into_view_if_needed()
    buttons = {label: stepper.locator("button", has_text=re.compile(f"^{label}$"))
               for label in ("next stage", "step", "run to next exit", "run", "stop")}
    expect(buttons["next stage"]).to_be_enabled()
    for label in ("step", "run to next exit", "run", "stop"):
        expect(buttons[label]).to_be_disabled()
        # and looks it: faded, as JupyterLab draws a disabled widget button
        assert float(buttons[label].evaluate("b => getComputedStyle(b).opacity")) < 1, label
    expect(buttons["stop"]).not_to_have_class(re.compile(r"\bmod-danger\b"))
    assert buttons["stop"].evaluate("b => getComputedStyle(b).backgroundColor") != DANGER_RED
    stepper.screenshot(path=artifacts / "lesson01-stepper.png")
