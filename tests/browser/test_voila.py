"""notebooks/dashboard.ipynb as Voilà serves it with the repository's voila.json (the `vlab`
template, kernel culling): the page asks nothing of other hosts and loads without version
warnings, says its printed text is a snapshot, its controls answer as a student expects,
and reloading it does not leave kernels (each with a VM) behind. Screenshots land in
artifacts/."""
from __future__ import annotations

import json
import re
import time

from playwright.sync_api import Page, expect

from conftest import REPO

RENDER_TIMEOUT = 120_000   # ms: kernel start, bring-up and the first run
# Culling as voila.json sets it up, with times a test can wait for
VOILA_CONFIG = {"MappingKernelManager": {"cull_idle_timeout": 4, "cull_interval": 1}}
VERSION_WARNING = re.compile(r"Unsatisfied version|No satisfying version")


def open_dashboard(page: Page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector(".vlab-dashboard .vlab-registers", timeout=RENDER_TIMEOUT)


def stepper_button(page: Page, label: str):
    return page.locator(".vlab-stagestepper button", has_text=re.compile(f"^{label}$"))


def test_voila_page_is_self_contained_and_free_of_version_warnings(voila, page, artifacts):
    requests, warnings = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: warnings.append(message.text)
            if VERSION_WARNING.search(message.text) else None)
    open_dashboard(page, voila.url)
    page.wait_for_load_state("networkidle")
    page.screenshot(path=artifacts / "voila-page.png")
    # blob: and data: URLs are the page's own; any http(s) one must be Voilà's
    assert [url for url in requests if url.startswith(("http://", "https://"))
            and not url.startswith(voila.url + "/")] == []
    assert warnings == []


def test_voila_page_says_its_printed_text_is_a_snapshot(voila, page):
    open_dashboard(page, voila.url)
    note = page.get_by_text("The text below is a snapshot")
    printed = page.locator("pre", has_text="vCPU 0 in real mode: RIP=0x8018")
    expect(note).to_be_visible()
    assert note.bounding_box()["y"] < printed.bounding_box()["y"]
    stepper_button(page, "step").click()      # the dashboard moves on, the snapshot stays
    expect(page.locator(".vlab-dashboard td[data-reg='rip']")).to_have_text("0000000000008019")
    expect(printed).to_be_visible()


def test_voila_console_and_run_after_q(voila, page, artifacts):
    open_dashboard(page, voila.url)
    status = page.locator(".vlab-stagestepper .vlab-info, .vlab-stagestepper .vlab-error").last
    console_input = page.locator(".vlab-serialconsole input")
    console_note = page.locator(".vlab-serialconsole .vlab-info, .vlab-serialconsole .vlab-error")
    # Typed before the guest runs: more than its 16-byte FIFO holds. Nothing the student
    # did wrong: the console says the guest is not reading, not in an error's red.
    console_input.fill("x" * 20)
    console_input.press("Enter")
    expect(console_note).to_contain_text("the guest is not reading COM1")
    expect(console_note).to_have_class(re.compile(r"\bvlab-info\b"))

    stepper_button(page, "run").click()
    console_input.fill("q")
    console_input.press("Enter")
    expect(status).to_contain_text("run: stopped: HLT")
    rip = page.locator(".vlab-dashboard td[data-reg='rip']")
    halted_at, printed = rip.inner_text(), page.locator(".vlab-console").inner_text()
    # run again after q: one exit, the HLT again, where it was (not the greeting run as code)
    stepper_button(page, "run").click()
    expect(status).to_contain_text(re.compile(r"run: stopped: HLT: the guest halted after 1 exits? "))
    expect(rip).to_have_text(halted_at)
    assert page.locator(".vlab-console").inner_text() == printed
    page.locator(".vlab-dashboard").screenshot(path=artifacts / "voila-after-q.png")


def test_voila_cpuid_tab_keeps_the_feature_in_sight_and_offers_a_new_lab(voila, page, artifacts):
    open_dashboard(page, voila.url)
    page.locator(".lm-TabBar-tab", has_text="CPUID").click()
    explorer = page.locator(".vlab-cpuidexplorer")
    selected = explorer.locator("tr.vlab-selected")     # lm's leaf, 0x80000001
    expect(selected).to_contain_text("0x80000001")
    in_sight = selected.evaluate("""row => {
        let box = row.parentElement;
        while (box && getComputedStyle(box).overflowY !== 'auto') box = box.parentElement;
        const r = row.getBoundingClientRect(), b = box.getBoundingClientRect();
        return r.top >= b.top && r.bottom <= b.bottom; }""")
    assert in_sight, "the chosen feature's row is scrolled out of its box"

    enabled = explorer.get_by_role("checkbox")
    expect(enabled).to_be_enabled()          # frozen by KVM_SET_CPUID2, still editable
    enabled.uncheck()
    new_lab = explorer.locator("button", has_text="new Lab with -lm")
    expect(new_lab).to_be_visible()
    explorer.screenshot(path=artifacts / "voila-cpuid-frozen-edit.png")
    new_lab.click()
    expect(explorer).to_contain_text("made a new Lab", timeout=30_000)


def test_voila_reloads_do_not_leave_kernels_running(voila, page):
    shipped = json.loads((REPO / "voila.json").read_text())["MappingKernelManager"]
    assert shipped["cull_idle_timeout"] > 0 and not shipped["cull_connected"]
    for _ in range(3):
        open_dashboard(page, voila.url)
    deadline = time.monotonic() + 30
    while len(voila.children()) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(voila.children()) == 1, "kernels of closed pages are still running"
    stepper_button(page, "step").click()     # the open page's kernel is the one left
    expect(page.locator(".vlab-dashboard td[data-reg='rip']")).to_have_text("0000000000008019")
