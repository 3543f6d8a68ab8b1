"""A class on one host (deploy/jupyterhub), for real: JupyterHub with its proxy on 127.0.0.1
from the deployment's own config, two student accounts created through the Hub's REST API,
both servers spawned through it, lesson 01 run in each student's copy of the curriculum
against /dev/kvm over the proxy, and what one student can reach of the other's: not their
server, home, processes or VM fds. Last, the idle culler stops both servers, VMs included.

The hub runs as root (it starts servers as the students' accounts); the accounts are removed
afterwards, with anything they left running."""
from __future__ import annotations

import json
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import websocket

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "jupyterhub" / "jupyterhub_config.py"
VENV_BIN = Path(sys.prefix) / "bin"
LESSON = "vlab-notebooks/01-accel-init.ipynb"   # the student's copy, made by the config's pre_spawn_hook
MEM_LIMIT, CPU_LIMIT, PIDS_LIMIT = 1 << 30, 1.5, 256   # per student, for the test
START_TIMEOUT = 90   # seconds, for the hub and for a server

pytestmark = pytest.mark.kvm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.25)
    tail = log.read_text()[-4000:] if log else ""
    raise AssertionError(f"{what}: not within {timeout} s\n{tail}")


@dataclass
class Hub:
    url: str
    token: str
    log: Path
    students: list[str] = field(default_factory=list)

    def api(self, method: str, path: str, token: str | None = None, **kwargs):
        return requests.request(method, f"{self.url}/hub/api/{path}", timeout=30,
                                headers={"Authorization": f"token {token or self.token}"},
                                **kwargs)


@dataclass
class Server:
    """A student's single-user server, reached through the hub's proxy with a token."""
    url: str
    token: str

    def api(self, method: str, path: str, **kwargs):
        return requests.request(method, f"{self.url}api/{path}", timeout=30,
                                headers={"Authorization": f"token {self.token}"}, **kwargs)

    def kernel(self) -> "Kernel":
        response = self.api("POST", "kernels", json={"name": "python3"})
        assert response.status_code == 201, response.text
        kernel_id = response.json()["id"]
        ws = websocket.create_connection(
            f"{self.url.replace('http', 'ws', 1)}api/kernels/{kernel_id}/channels",
            header=[f"Authorization: token {self.token}"], timeout=START_TIMEOUT)
        return Kernel(ws)

    def run_notebook(self, path: str) -> "Kernel":
        """Every code cell of the notebook at `path`, in order, in a new kernel (left running)."""
        response = self.api("GET", f"contents/{path}")
        assert response.status_code == 200, response.text
        kernel = self.kernel()
        for cell in response.json()["content"]["cells"]:
            if cell["cell_type"] == "code":
                kernel.execute(cell["source"])
        return kernel


@dataclass
class Kernel:
    """A kernel's channels over the Jupyter server's websocket (the JSON protocol)."""
    ws: websocket.WebSocket
    session: str = field(default_factory=lambda: uuid.uuid4().hex)

    def execute(self, code: str) -> str:
        """Run `code`; its text output, or AssertionError with the traceback."""
        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": self.session,
                       "username": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))
        text = []
        while True:
            message = json.loads(self.ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                text.append(content["text"])
            elif kind in ("execute_result", "display_data"):
                text.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                raise AssertionError(f"{code}\n" + "\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(text)

    def facts(self) -> dict:
        return json.loads(self.execute(
            "import json, os\n"
            "def fd_target(fd):\n"
            "    try:\n"
            "        return os.readlink(f'/proc/self/fd/{fd}')\n"
            "    except FileNotFoundError:   # the directory's own fd, closed by now\n"
            "        return None\n"
            "print(json.dumps({'pid': os.getpid(), 'home': os.path.expanduser('~'),\n"
            "    'accel': lab.accel.name, 'groups': os.getgroups(),\n"
            "    'vm_fds': [int(fd) for fd in os.listdir('/proc/self/fd')\n"
            "               if fd_target(fd) == 'anon_inode:kvm-vm']}))"))


def running(pid: int) -> bool:
    """Is `pid` a process that has not exited? (An exited one has closed its fds, VMs too.)"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_processes_of(uid: int) -> None:
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("JupyterHub starts each student's server as their Unix account: needs root")
    if not Path("/run/systemd/system").is_dir() and Path("/sys/fs/cgroup/cgroup.controllers").exists():
        pytest.skip("no systemd and cgroup v2 only: VlabSpawner's limits need cgroup v1 here")
    tmp = tmp_path_factory.mktemp("hub")
    port, token = free_port(), secrets.token_hex(32)
    (tmp / "jupyterhub_config.py").write_text(
        f"load_subconfig({str(CONFIG)!r})\n"
        f"c.JupyterHub.bind_url = 'http://127.0.0.1:{port}'\n"
        f"c.JupyterHub.hub_bind_url = 'http://127.0.0.1:{free_port()}'\n"
        f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{free_port()}'\n"
        "c.Authenticator.admin_users = set()\n"   # the config's teacher would get an account
        f"c.Spawner.mem_limit = {MEM_LIMIT}\n"
        f"c.Spawner.cpu_limit = {CPU_LIMIT}\n"
        f"c.VlabSpawner.pids_limit = {PIDS_LIMIT}\n"
        "c.JupyterHub.services.append({'name': 'test-admin', 'api_token': %r})\n"
        "c.JupyterHub.load_roles.append({'name': 'admin', 'services': ['test-admin']})\n" % token)
    log = tmp / "jupyterhub.log"
    env = dict(os.environ, VLAB_HUB_STATE=str(tmp / "state"))
    with open(log, "wb") as out:
        process = subprocess.Popen([str(VENV_BIN / "jupyterhub"), "-f", str(tmp / "jupyterhub_config.py")],
                                   cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    the_hub = Hub(f"http://127.0.0.1:{port}", token, log)

    def answers():
        assert process.poll() is None, f"jupyterhub exited {process.returncode}:\n{log.read_text()[-4000:]}"
        try:
            return the_hub.api("GET", "").status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_for(answers, START_TIMEOUT, "the hub answering through its proxy", log)
        yield the_hub
    finally:
        process.send_signal(signal.SIGTERM)   # the hub stops its servers, services and proxy
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for name in the_hub.students:
            remove_student(name)


def remove_student(name: str) -> None:
    """The account, its home, anything it left running, and its cgroups (if the hub did not
    stop its server)."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    deadline = time.monotonic() + 20
    while True:
        kill_processes_of(uid)
        removed = subprocess.run(["userdel", "--remove", name], capture_output=True, text=True)
        if removed.returncode == 0:   # else 8: a process of it still runs; try again
            break
        assert time.monotonic() < deadline, f"userdel {name}: {removed.stderr}"
        time.sleep(0.5)
    for line in Path("/proc/self/cgroup").read_text().splitlines():   # the hub's, inherited
        _, controllers, path = line.split(":", 2)
        for controller in filter(None, controllers.split(",")):
            leftover = Path("/sys/fs/cgroup", controller, path.lstrip("/"), f"vlab-{name}")
            if leftover.is_dir():
                leftover.rmdir()


@pytest.fixture(scope="module")
def classroom(hub):
    """Two students with running servers, each having run lesson 01 (its lab left open)."""
    names = [f"vlab-{role}-{secrets.token_hex(3)}" for role in ("a", "b")]
    hub.students.extend(names)
    response = hub.api("POST", "users", json={"usernames": names})
    assert response.status_code == 201, response.text
    for name in names:
        assert pwd.getpwnam(name), "create_system_users made the account"
        assert hub.api("POST", f"users/{name}/server").status_code in (201, 202)

    def ready(name):
        return hub.api("GET", f"users/{name}").json()["servers"].get("", {}).get("ready")

    servers = {}
    for name in names:
        wait_for(lambda: ready(name), START_TIMEOUT, f"{name}'s server", hub.log)
        response = hub.api("POST", f"users/{name}/tokens", json={"note": "test"})
        assert response.status_code == 201, response.text
        servers[name] = Server(f"{hub.url}/user/{name}/", response.json()["token"])
    with ThreadPoolExecutor() as pool:   # both students at once, as in a class
        kernels = dict(zip(names, pool.map(lambda name: servers[name].run_notebook(LESSON), names)))
    return names, servers, kernels


def test_each_student_runs_a_lesson_on_kvm(classroom):
    names, servers, kernels = classroom
    kvm_gid = os.stat("/dev/kvm").st_gid
    for name in names:
        facts = kernels[name].facts()
        assert facts["home"] == pwd.getpwnam(name).pw_dir
        assert facts["accel"] == "kvm", "the lesson's Lab(accel='auto') found /dev/kvm"
        assert kvm_gid in facts["groups"]
        assert len(facts["vm_fds"]) == 1, "lesson 01's lab keeps its VM open"
        output = kernels[name].execute("lab.bring_up()\nprint(lab.run())\nprint(lab.console)")
        assert "HLT" in output and "Hello from real mode" in output, output


def test_vms_per_student_are_limited_over_all_their_kernels(classroom):
    (a, b), servers, kernels = classroom
    second = servers[a].kernel()   # a second notebook of the same student
    try:
        second.execute("from vlab.kvm import Kvm\nkvm = Kvm()\nvm = kvm.create_vm()")
        refused = json.loads(kernels[a].execute(
            "import json, os\n"
            "from vlab.kvm import Kvm, VmLimitReached\n"
            "extra = []\n"
            "try:\n"
            "    while True:\n"
            "        extra.append(Kvm().create_vm())\n"
            "except VmLimitReached as error:\n"
            "    print(json.dumps({'limit': os.environ['VLAB_MAX_VMS'], 'held': error.held,\n"
            "                      'made': len(extra)}))\n"
            "for vm in extra:\n"
            "    vm.close()"))
        assert refused["held"] == int(refused["limit"]), refused
        assert refused["made"] == int(refused["limit"]) - 2, "lesson 01's VM and the second kernel's"
        other = kernels[b].execute("from vlab.kvm import Kvm\n"
                                   "with Kvm() as kvm, kvm.create_vm() as vm:\n    print(vm.fd > 0)")
        assert other == "True\n", "the other student's VMs are theirs to count"
    finally:
        second.execute("vm.close()")
        second.ws.close()


def test_a_students_token_does_not_open_another_students_server(classroom):
    (a, b), servers, _ = classroom
    own = servers[b].api("GET", "contents/vlab-notebooks")
    assert own.status_code == 200
    for path in ("contents/vlab-notebooks", "kernels"):
        other = Server(servers[b].url, servers[a].token).api("GET", path)
        assert other.status_code in (403, 404), (path, other.status_code)
    anonymous = requests.get(f"{servers[b].url}api/kernels", timeout=30, allow_redirects=False)
    assert anonymous.status_code in (302, 403), anonymous.status_code


def test_a_students_code_cannot_reach_another_students_files_or_vm(classroom):
    (a, b), _, kernels = classroom
    own, other = kernels[a].facts(), kernels[b].facts()
    probe = (
        "import ctypes, json, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def getfd(pid, fd):\n"
        "    pidfd = os.pidfd_open(pid)\n"
        "    try:\n"
        "        copy = libc.syscall(438, pidfd, fd, 0)   # pidfd_getfd(2): another's fd\n"
        "        if copy < 0:\n"
        "            raise OSError(ctypes.get_errno(), 'pidfd_getfd')\n"
        "        os.close(copy)\n"
        "    finally:\n"
        "        os.close(pidfd)\n"
        "def attempt(action):\n"
        "    try:\n"
        "        action()\n"
        "        return 'allowed'\n"
        "    except PermissionError:\n"
        "        return 'denied'\n"
        "def probes(pid, home, vm_fd):\n"
        "    return {'home': attempt(lambda: os.listdir(home)),\n"
        "            'lesson': attempt(lambda: open(home + '/vlab-notebooks/01-accel-init.ipynb').close()),\n"
        "            'fds': attempt(lambda: os.listdir(f'/proc/{pid}/fd')),\n"
        "            'vm fd': attempt(lambda: getfd(pid, vm_fd)),\n"
        "            'memory': attempt(lambda: open(f'/proc/{pid}/mem', 'rb').close()),\n"
        "            'signal': attempt(lambda: os.kill(pid, 0))}\n")
    kernels[a].execute(probe)

    def probes(pid, home, vm_fd):
        return json.loads(kernels[a].execute(
            f"print(json.dumps(probes({pid}, {home!r}, {vm_fd})))"))

    mine = probes(own["pid"], own["home"], own["vm_fds"][0])
    assert set(mine.values()) == {"allowed"}, mine   # the probes can succeed
    theirs = probes(other["pid"], other["home"], other["vm_fds"][0])
    assert set(theirs.values()) == {"denied"}, theirs


def test_each_server_runs_within_its_memory_cpu_and_task_limits(classroom):
    names, _, kernels = classroom
    for name in names:
        pid = kernels[name].facts()["pid"]   # a kernel: its server's cgroups are its own
        cgroups = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
        if "memory" in cgroups:   # cgroup v1 (VlabSpawner)
            def read(controller, file):
                assert name in cgroups[controller]
                return Path("/sys/fs/cgroup", controller, cgroups[controller].lstrip("/"), file).read_text()
            memory = int(read("memory", "memory.limit_in_bytes"))
            cpus = int(read("cpu", "cpu.cfs_quota_us")) / int(read("cpu", "cpu.cfs_period_us"))
            assert int(read("pids", "pids.max")) == PIDS_LIMIT
        else:                     # cgroup v2 (SystemdSpawner's unit)
            unit = Path("/sys/fs/cgroup", cgroups[""].lstrip("/"))
            assert name in str(unit)
            memory = int((unit / "memory.max").read_text())
            quota, period = (unit / "cpu.max").read_text().split()
            cpus = int(quota) / int(period)
        assert (memory, cpus) == (MEM_LIMIT, CPU_LIMIT)


def test_idle_culler_stops_both_servers_and_their_vms(hub, classroom):
    """Runs last: the culler that the config starts waits an hour; the same culler with a
    1 s timeout, on the admin token, stops both servers, and their kernels and VMs end."""
    names, _, kernels = classroom
    services = hub.api("GET", "services").json()
    assert services["idle-culler"]["pid"], "the config's culler runs as a hub service"
    pids = [kernels[name].facts()["pid"] for name in names]
    for kernel in kernels.values():
        kernel.ws.close()
    time.sleep(1.5)
    culler = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub_idle_culler", "--timeout=1", "--cull-every=1",
         f"--url={hub.url}/hub/api"],
        env=dict(os.environ, JUPYTERHUB_API_TOKEN=hub.token),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def stopped():
            return all(not hub.api("GET", f"users/{name}").json()["servers"] for name in names)
        wait_for(stopped, 60, "the culler stopping both servers", hub.log)
    finally:
        culler.terminate()
        culler.wait(10)
    for pid in pids:
        assert not running(pid), f"kernel {pid} (with its VM) outlived its server"
