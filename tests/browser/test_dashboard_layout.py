"""notebooks/dashboard.ipynb in JupyterLab at 1440x1000, as a student sees it: the stepper,
the registers and the exit histogram on screen at once, the histogram's text readable, the
disassembly's source comments in sight without scrolling sideways. The notebook runs once
for the module; screenshots of the window and the histogram land in artifacts/."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

WIDTH, HEIGHT = 1440, 1000
RENDER_TIMEOUT = 120_000   # ms: kernel start, bring-up and the first run
MIN_TEXT_PX = 10


@pytest.fixture(scope="module")
def dashboard(browser, module_jupyterlab):
    """The Dashboard after Run All, scrolled to the top of the notebook's panel."""
    server = module_jupyterlab
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    page = context.new_page()
    try:
        page.goto(f"{server.url}/lab/tree/dashboard.ipynb")
        page.get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=RENDER_TIMEOUT)
        page.locator(".lm-MenuBar-item", has_text=re.compile("^Run$")).click()
        page.locator(".lm-Menu-item", has_text=re.compile("^Run All Cells")).click()
        dashboard = page.locator(".vlab-dashboard")
        expect(dashboard.locator("td[data-reg='rip']")).to_be_visible(timeout=RENDER_TIMEOUT)
        dashboard.evaluate("e => e.scrollIntoView({block: 'start'})")
        page.wait_for_timeout(500)   # JupyterLab's windowed notebook settles after scrolling
        yield dashboard
    finally:
        context.close()


def test_stepper_registers_and_histogram_fit_a_1440x1000_window(dashboard, artifacts):
    dashboard.page.screenshot(path=artifacts / "dashboard-1440x1000.png")
    for part in (".vlab-stagestepper", ".vlab-registerview", ".vlab-exithistogram"):
        box = dashboard.locator(part).bounding_box()
        assert box is not None, f"{part} is not rendered"
        inside = (box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= WIDTH
                  and box["y"] + box["height"] <= HEIGHT)
        assert inside, f"{part} at {box} is not wholly inside the {WIDTH}x{HEIGHT} window"


def test_histogram_text_is_at_least_10_px(dashboard, artifacts):
    histogram = dashboard.locator(".vlab-exithistogram")
    histogram.screenshot(path=artifacts / "exit-histogram.png")
    # Every piece of text, with its rendered font size: the labels must be text, not a picture.
    sizes = histogram.evaluate("""root => [...root.querySelectorAll('*')]
        .filter(e => [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()))
        .map(e => [e.textContent.trim().slice(0, 40), parseFloat(getComputedStyle(e).fontSize)])""")
    assert any(text == "IO in" for text, _ in sizes), f"no 'IO in' label among {sizes}"
    small = [(text, px) for text, px in sizes if px < MIN_TEXT_PX]
    assert not small, f"histogram text under {MIN_TEXT_PX} px: {small}"


def test_disassembly_shows_source_comments_without_scrolling_sideways(dashboard):
    disassembly = dashboard.locator("div.vlab-disassembly")
    scrolling = disassembly.evaluate("""e => [e, ...e.querySelectorAll('*')]
        .filter(x => x.scrollWidth > x.clientWidth + 1 && getComputedStyle(x).overflowX !== 'visible')
        .length""")
    assert scrolling == 0, "the disassembly scrolls sideways"
    lsr = disassembly.get_by_text("; in al, dx ; LSR")   # the source line at RIP, comment included
    box = lsr.bounding_box()
    assert box is not None and box["x"] + box["width"] <= WIDTH
    dashboard_box = dashboard.bounding_box()
    assert box["x"] + box["width"] <= dashboard_box["x"] + dashboard_box["width"]
