"""notebooks/dashboard.ipynb in a real browser: JupyterLab runs it and the Dashboard renders,
answers its buttons and streams a running guest; Voilà renders it as a standalone page."""
from __future__ import annotations

import re

from playwright.sync_api import Page, expect

RENDER_TIMEOUT = 120_000   # ms: kernel start, bring-up and the first run
RIP_AT_FIRST_POLL = "0000000000008018"   # the guest's `in al, dx` reading LSR
RIP_AFTER_STEP = "0000000000008019"


def button(page: Page, label: str):
    return page.locator(".vlab-dashboard button", has_text=re.compile(f"^{label}$"))


def check_dashboard(page: Page) -> None:
    """The dashboard is live: "step" moves RIP in the RegisterView; the histogram shows."""
    page.wait_for_selector(".vlab-dashboard .vlab-registers", timeout=RENDER_TIMEOUT)
    rip = page.locator(".vlab-dashboard td[data-reg='rip']")
    expect(rip).to_have_text(RIP_AT_FIRST_POLL)
    button(page, "step").click()
    expect(rip).to_have_text(RIP_AFTER_STEP)
    expect(page.locator(".vlab-dashboard td.vlab-changed[data-reg='rip']")).to_be_visible()
    histogram = page.locator(".vlab-exithistogram .vlab-histogram")
    expect(histogram.locator("tr[data-exit='IO in']")).to_be_visible()


def test_jupyterlab_runs_the_dashboard_notebook(jupyterlab, page, artifacts):
    page.goto(f"{jupyterlab.url}/lab/tree/dashboard.ipynb")
    # Run All is enabled once the notebook's kernel is up (the status bar says so).
    page.get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=RENDER_TIMEOUT)
    page.locator(".lm-MenuBar-item", has_text=re.compile("^Run$")).click()
    page.locator(".lm-Menu-item", has_text=re.compile("^Run All Cells")).click()
    check_dashboard(page)

    # "run" works in the background: the page keeps talking to the kernel while the guest
    # polls COM1, typed input reaches the guest, the histogram redraws, "stop" stops it.
    io_in = page.locator(".vlab-exithistogram tr[data-exit='IO in'] td").last
    io_in_before = io_in.inner_text()
    button(page, "run").click()
    expect(button(page, "stop")).to_be_enabled()
    console_input = page.locator(".vlab-serialconsole input")
    console_input.fill("hello")
    console_input.press("Enter")
    expect(page.locator(".vlab-console")).to_contain_text("HELLO")
    expect(io_in).not_to_have_text(io_in_before)
    button(page, "stop").click()
    expect(page.locator(".vlab-stagestepper")).to_contain_text("run: stopped: stopped from the stepper")
    expect(button(page, "step")).to_be_enabled()
    page.locator(".vlab-dashboard").screenshot(path=artifacts / "dashboard-jupyterlab.png")


def test_voila_renders_the_dashboard_standalone(voila, page, artifacts):
    page.goto(voila.url + "/")
    check_dashboard(page)
    page.locator(".vlab-dashboard").screenshot(path=artifacts / "dashboard-voila.png")
