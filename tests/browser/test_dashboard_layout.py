"""notebooks/dashboard.ipynb in JupyterLab at 1440x1000, as a student sees it: the stepper,
the registers and the exit histogram on screen at once, the histogram's text readable, the
disassembly's source comments in sight without scrolling sideways. Screenshots of the
window and the histogram land in artifacts/."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

WIDTH, HEIGHT = 1440, 1000
RENDER_TIMEOUT = 120_000   # ms: kernel start, bring-up and the first run
MIN_TEXT_PX = 10


@pytest.fixture
def window(browser):
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    yield context.new_page()
    context.close()


def test_dashboard_fits_a_1440x1000_window_readably(jupyterlab, window, artifacts):
    page = window
    page.goto(f"{jupyterlab.url}/lab/tree/dashboard.ipynb")
    page.get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=RENDER_TIMEOUT)
    page.locator(".lm-MenuBar-item", has_text=re.compile("^Run$")).click()
    page.locator(".lm-Menu-item", has_text=re.compile("^Run All Cells")).click()
    dashboard = page.locator(".vlab-dashboard")
    histogram = dashboard.locator(".vlab-exithistogram")
    expect(histogram.locator("tr[data-exit='IO in']")).to_be_visible(timeout=RENDER_TIMEOUT)
    dashboard.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)   # JupyterLab's windowed notebook settles after scrolling
    page.screenshot(path=artifacts / "dashboard-1440x1000.png")

    for part in (".vlab-stagestepper", ".vlab-registerview", ".vlab-exithistogram"):
        box = dashboard.locator(part).bounding_box()
        assert box is not None, f"{part} is not rendered"
        inside = (box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= WIDTH
                  and box["y"] + box["height"] <= HEIGHT)
        assert inside, f"{part} at {box} is not wholly inside the {WIDTH}x{HEIGHT} window"

    # Every piece of the histogram's text is real text, and at least MIN_TEXT_PX tall.
    sizes = histogram.evaluate("""root => [...root.querySelectorAll('*')]
        .filter(e => [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()))
        .map(e => [e.textContent.trim().slice(0, 40), parseFloat(getComputedStyle(e).fontSize)])""")
    assert any(text == "IO in" for text, _ in sizes)
    small = [(text, px) for text, px in sizes if px < MIN_TEXT_PX]
    assert not small, f"histogram text under {MIN_TEXT_PX} px: {small}"
    histogram.screenshot(path=artifacts / "exit-histogram.png")

    # Source comments are in sight: nothing in the disassembly scrolls sideways or is cut off.
    disassembly = dashboard.locator("div.vlab-disassembly")
    overflow = disassembly.evaluate("""e => [e, ...e.querySelectorAll('*')]
        .filter(x => x.scrollWidth > x.clientWidth + 1 && getComputedStyle(x).overflowX !== 'visible')
        .length""")
    assert overflow == 0, "the disassembly scrolls sideways"
    source = disassembly.locator(".vlab-source", has_text=re.compile(r"\S")).first
    box = source.bounding_box()
    assert box is not None and box["x"] + box["width"] <= WIDTH
