"""JupyterHub for a vlab class on one host: each student's server runs as their own Unix
account with /dev/kvm, within memory, CPU and task limits, and is stopped when idle.

    tools/setup.sh hub                      # JupyterHub, the idle culler, the proxy, into .venv
    sudo .venv/bin/jupyterhub -f deploy/jupyterhub/jupyterhub_config.py

Run from the checkout, as root (the hub starts servers as other users). Students log in with
their Unix password (PAM); an admin adds them on the hub's admin page, which creates the
account (set its password with `passwd NAME`). Edit the settings below for your class.
"""
import os
import pwd
import shutil
import sys
from pathlib import Path

c = get_config()  # noqa: F821 (defined by JupyterHub's config loader)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]   # the checkout: vlab (installed editable) and its notebooks
CURRICULUM = REPO / "notebooks"
VENV_BIN = Path(sys.prefix) / "bin"
STATE = Path(os.environ.get("VLAB_HUB_STATE", "/srv/vlab-hub"))  # the hub's database, cookie secret
STATE.mkdir(mode=0o700, parents=True, exist_ok=True)
TASKS_MAX = 512  # processes and threads of one server: kernels, vCPU threads

# --- the hub ------------------------------------------------------------------------------
c.JupyterHub.bind_url = "http://:8000"       # behind TLS for a real class (ssl_cert, ssl_key)
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
if (VENV_BIN / "configurable-http-proxy").exists():  # where tools/setup.sh puts it
    c.ConfigurableHTTPProxy.command = [str(VENV_BIN / "configurable-http-proxy")]

# --- students: Unix accounts, PAM passwords -----------------------------------------------
c.JupyterHub.authenticator_class = "pam"
c.Authenticator.admin_users = {"teacher"}      # their account is created on the first start
c.Authenticator.allow_existing_users = True  # whoever an admin adds may log in
c.LocalAuthenticator.create_system_users = True
c.LocalAuthenticator.add_user_cmd = ["useradd", "--create-home", "--shell", "/bin/bash"]

# --- each student's server ----------------------------------------------------------------
c.Spawner.cmd = [str(VENV_BIN / "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab/tree/vlab-notebooks/00-index.ipynb"
c.Spawner.mem_limit = "2G"      # the server, its kernels and their guests' RAM together
c.Spawner.cpu_limit = 1.0       # cores
c.Spawner.environment = {"VLAB_MAX_VMS": "4"}  # VMs open at once, over all the student's kernels
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 60


def prepare_home(spawner):
    """Close the student's home to others (useradd leaves it 0755 on Debian) and give them
    their own copy of the curriculum on their first start."""
    user = pwd.getpwnam(spawner.user.name)
    home = Path(user.pw_dir)
    home.chmod(0o700)
    lessons = home / "vlab-notebooks"
    if not lessons.exists():
        shutil.copytree(CURRICULUM, lessons, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        for path in [lessons, *lessons.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)


c.Spawner.pre_spawn_hook = prepare_home

# what every server reads: the lab's interpreter, its environment, the checkout (vlab)
READABLE = [sys.base_prefix, sys.prefix, str(REPO)]
sys.path.insert(0, str(HERE))
from vlab_spawner import unreachable_parents  # noqa: E402

if Path("/run/systemd/system").is_dir():
    # systemd is the init: each server is a transient unit with its limits
    c.JupyterHub.spawner_class = "systemdspawner.SystemdSpawner"
    c.SystemdSpawner.isolate_tmp = True
    c.SystemdSpawner.isolate_devices = False    # PrivateDevices would hide /dev/kvm
    c.SystemdSpawner.disable_user_sudo = True
    properties = {"SupplementaryGroups": "kvm", "TasksMax": str(TASKS_MAX)}
    if hidden := unreachable_parents(READABLE):   # e.g. a Python under /root, as pyenv's
        properties["TemporaryFileSystem"] = " ".join(f"{parent}:ro" for parent in hidden)
        properties["BindReadOnlyPaths"] = " ".join(p for paths in hidden.values() for p in paths)
    c.SystemdSpawner.unit_extra_properties = properties
else:
    # no systemd (a container, a minimal host): cgroup v1 limits, set by vlab_spawner
    c.JupyterHub.spawner_class = "vlab_spawner.VlabSpawner"
    c.VlabSpawner.pids_limit = TASKS_MAX
    c.VlabSpawner.readable_paths = READABLE

# --- idle servers are stopped (their kernels and VMs with them) ---------------------------
c.JupyterHub.services = [{
    "name": "idle-culler",
    "command": [sys.executable, "-m", "jupyterhub_idle_culler", "--timeout=3600"],
}]
c.JupyterHub.load_roles = [{
    "name": "idle-culler",
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
    "services": ["idle-culler"],
}]
