"""The real-browser tier: JupyterLab or Voilà on 127.0.0.1, driven by Playwright with
Debian's Chromium. Servers get a temporary root, settings, config and runtime directory and
a copy of the notebook with its outputs cleared (so any dashboard on the page comes from the
live kernel), and are stopped by their own PID, their kernels with them."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from vlab.kvm import kvm_usable

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
START_TIMEOUT = 90   # seconds for a server to answer


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.browser)


def pytest_runtest_setup(item):
    if not item.get_closest_marker("browser"):
        return
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (tools/setup.sh test does)")
    usable, why = kvm_usable()
    if not usable:
        pytest.skip(f"the dashboard notebook runs a KVM guest: {why}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook_copy(name: str, directory: Path, outputs: bool = False) -> Path:
    """`notebooks/<name>`, by default without outputs or saved widget state."""
    notebook = json.loads((REPO / "notebooks" / name).read_text())
    if not outputs:
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
        notebook["metadata"].pop("widgets", None)
    path = directory / name
    path.write_text(json.dumps(notebook))
    return path


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def children(self) -> list[int]:
        """PIDs of the server's child processes (its kernels)."""
        pids = []
        for children in Path(f"/proc/{self.process.pid}/task").glob("*/children"):
            try:
                pids += [int(pid) for pid in children.read_text().split()]
            except OSError:
                pass
        return pids

    def stop(self) -> None:
        kernels = self.children()
        self.process.send_signal(signal.SIGTERM)   # both servers shut their kernels down on it
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        deadline = time.monotonic() + 10
        for pid in kernels:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


def start(command: list[str], url: str, workdir: Path) -> Server:
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               JUPYTER_CONFIG_DIR=str(workdir / "config"),
               JUPYTER_RUNTIME_DIR=str(workdir / "runtime"),
               JUPYTER_DATA_DIR=str(workdir / "data"),
               JUPYTERLAB_SETTINGS_DIR=str(workdir / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(workdir / "workspaces"))
    # No news: the server is told not to fetch any (LabApp options) and the page not to ask.
    notification = workdir / "settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True, exist_ok=True)
    notification.write_text(json.dumps({"checkForUpdates": False, "fetchNews": "false"}))
    # Every cell in the page (no windowing), so a test finds a widget far down a notebook.
    tracker = workdir / "settings/@jupyterlab/notebook-extension/tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True, exist_ok=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    log = workdir / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(url, process, log)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{command[2]} exited with {process.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url + "/vlab-readiness-probe", timeout=2).close()
            return server
        except urllib.error.HTTPError:   # an answer, even 404: the server is up
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"{command[2]} did not answer in {START_TIMEOUT} s:\n{log.read_text()}")
            time.sleep(0.25)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.call_failed = report.failed
    return report


@pytest.fixture
def page(browser, request):
    """A fresh page; when the test fails, its screenshot lands in artifacts/."""
    context = browser.new_context(viewport={"width": 1600, "height": 2000})
    page = context.new_page()
    yield page
    if getattr(request.node, "call_failed", False):
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"failed-{request.node.name}.png")
    context.close()


@pytest.fixture
def jupyterlab(tmp_path, request):
    """JupyterLab serving a copy of notebooks/dashboard.ipynb, or of the notebook the test
    module names in NOTEBOOK (with its stored outputs and widget state if WITH_OUTPUTS)."""
    server = serve_jupyterlab(getattr(request.module, "NOTEBOOK", "dashboard.ipynb"), tmp_path,
                              outputs=getattr(request.module, "WITH_OUTPUTS", False))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_jupyterlab(tmp_path_factory, request):
    """As `jupyterlab`, one server for the whole test module (its tests look at one run)."""
    workdir = tmp_path_factory.mktemp("jupyterlab")
    server = serve_jupyterlab(getattr(request.module, "NOTEBOOK", "dashboard.ipynb"), workdir)
    yield server
    server.stop()


def serve_jupyterlab(notebook: str, workdir: Path, outputs: bool = False) -> Server:
    """JupyterLab serving a copy of notebooks/<notebook> from workdir/root."""
    root = workdir / "root"
    root.mkdir()
    copy = notebook_copy(notebook, root, outputs)
    if outputs:
        # JupyterLab draws stored widgets only in a trusted notebook: sign the copy as a
        # reader does with "Trust Notebook" (the server's own data directory, below).
        from nbformat.sign import NotebookNotary
        signed = nbformat.read(copy, as_version=4)
        (workdir / "data").mkdir(exist_ok=True)
        NotebookNotary(data_dir=str(workdir / "data")).sign(signed)
        nbformat.write(signed, copy)
    port = free_port()
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.root_dir={root}",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               "--ServerApp.token=", "--ServerApp.password=",
               "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    return start(command, f"http://127.0.0.1:{port}", workdir)


@pytest.fixture
def voila(tmp_path, request):
    """Voilà rendering a copy of notebooks/dashboard.ipynb as a standalone page, with the
    repository's voila.json (read from the directory Voilà starts in), each section updated
    by the test module's VOILA_CONFIG if it has one."""
    if importlib.util.find_spec("voila") is None:   # run as `python -m voila`, as JupyterLab
        pytest.skip("voila is not installed (it is in vlab's test extra)")
    config = json.loads((REPO / "voila.json").read_text())
    for section, values in getattr(request.module, "VOILA_CONFIG", {}).items():
        config.setdefault(section, {}).update(values)
    (tmp_path / "voila.json").write_text(json.dumps(config))
    root = tmp_path / "root"
    root.mkdir()
    notebook = notebook_copy("dashboard.ipynb", root)
    port = free_port()
    command = [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--port={port}",
               "--Voila.ip=127.0.0.1", "--Voila.port_retries=0"]
    server = start(command, f"http://127.0.0.1:{port}", tmp_path)
    yield server
    server.stop()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
