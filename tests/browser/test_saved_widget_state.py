"""A freshly opened lesson shows its widgets from the state stored when the notebooks were
executed (tools/run_notebooks.py), before anything runs: 05's disassembly, as at its cell,
with RIP at the guest's first instruction. The kernel is shut down first, so only the saved
state can draw them; a screenshot lands in artifacts/."""
from __future__ import annotations

import re

from playwright.sync_api import expect

NOTEBOOK = "05-memory-and-loading.ipynb"
WITH_OUTPUTS = True
RENDER_TIMEOUT = 60_000   # ms


def test_lesson_shows_its_widgets_from_saved_state(jupyterlab, page, artifacts):
    page.goto(f"{jupyterlab.url}/lab/tree/{NOTEBOOK}")
    page.get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=RENDER_TIMEOUT)
    page.locator(".lm-MenuBar-item", has_text=re.compile("^Kernel$")).click()
    page.locator(".lm-Menu-item", has_text=re.compile("^Shut Down Kernel")).click()
    page.get_by_text(re.compile(r"No Kernel \| ")).wait_for(timeout=RENDER_TIMEOUT)

    disassembly = page.locator(".vlab-disassembly")
    disassembly.scroll_into_view_if_needed(timeout=RENDER_TIMEOUT)
    expect(disassembly.locator(".vlab-snapshot")).to_have_text(re.compile("^as at this cell"))
    expect(disassembly.locator("tr.vlab-current")).to_contain_text("cld")
    expect(page.locator(".vlab-memoryview pre.vlab-memory")).to_contain_text("|")
    disassembly.screenshot(path=artifacts / "saved-state-05-disassembly.png")
