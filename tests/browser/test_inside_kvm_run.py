"""notebooks/11-inside-kvm-run.ipynb in JupyterLab: the kernel-trace views render from a
live traced lab (the exit table with a row per reason, the KVM_RUN timeline with its lanes,
and its ◀ button steps to the KVM_RUN before); screenshots of both land in artifacts/."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from vlab.kvm.kernel_trace import kernel_trace_usable

NOTEBOOK = "11-inside-kvm-run.ipynb"
RENDER_TIMEOUT = 180_000   # ms: kernel start, two labs brought up and run


@pytest.fixture(autouse=True)
def kernel_trace_here():
    usable, why = kernel_trace_usable()
    if not usable:
        pytest.skip(f"the notebook's views show a traced lab: {why}")


def test_jupyterlab_renders_the_kernel_trace_views(jupyterlab, page, artifacts):
    page.goto(f"{jupyterlab.url}/lab/tree/{NOTEBOOK}")
    page.get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=RENDER_TIMEOUT)
    page.locator(".lm-MenuBar-item", has_text=re.compile("^Run$")).click()
    page.locator(".lm-Menu-item", has_text=re.compile("^Run All Cells")).click()

    table = page.locator(".vlab-kernelexittable")
    table.wait_for(timeout=RENDER_TIMEOUT)
    table.scroll_into_view_if_needed()
    # one row per exit reason; the userspace column counts the guest's three exits
    expect(table.locator("tr[data-reason]").first).to_be_visible()
    assert table.locator("tr[data-reason]").count() >= 2
    table.screenshot(path=artifacts / "kernel-exit-table.png")

    timeline = page.locator(".vlab-kvmruntimeline").first
    timeline.scroll_into_view_if_needed()
    expect(timeline).to_contain_text("KVM_RUN #2 (vCPU 0)")
    expect(timeline.locator("tr.vlab-kind-call")).to_have_count(1)
    expect(timeline.locator("tr.vlab-kind-userspace")).to_have_count(1)
    expect(timeline.locator(".vlab-timeline-strip span").first).to_be_visible()
    timeline.screenshot(path=artifacts / "kvm-run-timeline.png")
    timeline.locator("button", has_text="◀").click()
    expect(timeline).to_contain_text("KVM_RUN #1 (vCPU 0)")
