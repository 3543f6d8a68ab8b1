"""The spawner for a class on one host without systemd (where systemd runs,
jupyterhub_config.py picks SystemdSpawner instead).

`VlabSpawner` is JupyterHub's LocalProcessSpawner (each student's server runs as their own
Unix account) with three additions:

- /dev/kvm: the device's group is added to the server's groups, as `docker run --device`
  grants a container the device, so students need no membership of group kvm;
- limits: the server and everything it starts (kernels, their VMs and vCPU threads) run in
  cgroups (v1 hierarchies memory, cpu and pids, below the hub's own) that cap memory
  (`mem_limit`), CPU (`cpu_limit`, in cores) and tasks (`pids_limit`); when the server
  stops, whatever is left in them is killed, so a stopped or culled server leaves no VM;
- the lab's Python: where it lies under a directory students cannot enter (a Python built
  under /root, as pyenv installs it), the server gets a private mount namespace with a
  tmpfs over that directory and only the lab's paths bound into it read-only, as systemd's
  ProtectHome=tmpfs with BindReadOnlyPaths= does.
"""
import asyncio
import ctypes
import os
import pwd
import signal
import stat
import sys
import time
from pathlib import Path

from jupyterhub.spawner import LocalProcessSpawner
from traitlets import Integer, List, Unicode, default

CGROUP_ROOT = Path("/sys/fs/cgroup")
CFS_PERIOD_US = 100_000

# <sched.h> and <sys/mount.h>
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
# statvfs's f_flag bits that a remount of a bind mount must keep (the kernel refuses to
# drop a flag its source mount has when that flag is locked)
KEPT_MOUNT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC


def _check(result: int) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def hub_cgroups() -> dict[str, str]:
    """The calling process's cgroup path in each v1 hierarchy, by controller."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def unreachable_parents(paths: list[str]) -> dict[str, list[str]]:
    """Each topmost directory that other users cannot enter (no o+x), with the paths below it
    to bind back. A path that is itself such a directory (a checkout in a 0700 folder) has
    its entries bound back, since a bind keeps the directory's own mode."""
    plan: dict[str, list[str]] = {}
    for path in sorted({os.path.realpath(p) for p in paths}):   # a directory before its subdirectories
        target = Path(path)
        for directory in (*reversed(target.parents), target):
            if directory.is_dir() and not os.stat(directory).st_mode & stat.S_IXOTH:
                below = sorted(map(str, target.iterdir())) if directory == target else [path]
                bound = plan.setdefault(str(directory), [])
                bound += [p for p in below if p not in bound]
                break
    return plan


class VlabSpawner(LocalProcessSpawner):
    kvm_device = Unicode(
        "/dev/kvm", config=True,
        help="The KVM device; its group (unless root's) is added to each server's groups.")
    pids_limit = Integer(
        512, config=True,
        help="Tasks (processes and threads: the server, its kernels, their vCPU threads) a "
             "server may have at once; 0 for no limit.")
    readable_paths = List(
        Unicode(), config=True,
        help="Paths every server needs (the lab's interpreter and environment); those under "
             "a directory students cannot enter are bound into a tmpfs over that directory.")

    @default("readable_paths")
    def _default_readable_paths(self):
        return [sys.base_prefix, sys.prefix]

    def cgroup_limits(self) -> dict[str, dict[str, int]]:
        """The limit files to write, by v1 controller (in the order they must be written)."""
        limits = {}
        if self.mem_limit:
            limits["memory"] = {"memory.limit_in_bytes": int(self.mem_limit)}
        if self.cpu_limit:
            limits["cpu"] = {"cpu.cfs_period_us": CFS_PERIOD_US,
                             "cpu.cfs_quota_us": int(self.cpu_limit * CFS_PERIOD_US)}
        if self.pids_limit:
            limits["pids"] = {"pids.max": self.pids_limit}
        return limits

    def cgroups(self) -> list[Path]:
        """This server's cgroup directories, one per limited controller."""
        limits = self.cgroup_limits()
        if limits and (CGROUP_ROOT / "cgroup.controllers").exists():
            raise RuntimeError(
                "VlabSpawner limits servers with cgroup v1 hierarchies; this host has cgroup v2 "
                "only: run systemd and use SystemdSpawner (jupyterhub_config.py picks it where "
                "systemd runs), or set mem_limit, cpu_limit and pids_limit to 0")
        hub = hub_cgroups()
        return [CGROUP_ROOT / controller / hub[controller].lstrip("/") / f"vlab-{self.user.name}"
                for controller in limits]

    async def start(self):
        for directory, files in zip(self.cgroups(), self.cgroup_limits().values()):
            directory.mkdir(exist_ok=True)
            for name, value in files.items():
                (directory / name).write_text(str(value))
        return await super().start()

    async def stop(self, now=False):
        await super().stop(now=now)
        await self.kill_cgroups()

    async def kill_cgroups(self, timeout: float = 10.0) -> None:
        """SIGKILL whatever the server left in its cgroups (kernels, VMs), then remove them."""
        deadline = time.monotonic() + timeout
        for directory in self.cgroups():
            if not directory.exists():
                continue
            while pids := (directory / "cgroup.procs").read_text().split():
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if time.monotonic() > deadline:
                    self.log.warning("%s: processes %s outlived SIGKILL", directory, pids)
                    break
                await asyncio.sleep(0.05)
            else:
                directory.rmdir()

    def make_preexec_fn(self, name):
        user = pwd.getpwnam(name)
        groups = os.getgrouplist(name, user.pw_gid)
        if os.path.exists(self.kvm_device) and (kvm_gid := os.stat(self.kvm_device).st_gid):
            groups.append(kvm_gid)   # never group root, where the device is root's (and 0666)
        procs = [directory / "cgroup.procs" for directory in self.cgroups()]
        mounts = unreachable_parents(self.readable_paths)
        libc = ctypes.CDLL(None, use_errno=True)

        def preexec():
            # as root, after fork: into the cgroups, the mounts, then the student's identity
            for path in procs:
                path.write_text(str(os.getpid()))
            if mounts:
                bind_into_tmpfs(libc, mounts)
            os.setgid(user.pw_gid)
            os.setgroups(groups)
            os.setuid(user.pw_uid)
            os.chdir(user.pw_dir)

        return preexec


def bind_into_tmpfs(libc, mounts: dict[str, list[str]]) -> None:
    """In a new mount namespace: a tmpfs (mode 0755) over each directory, with the given
    paths below it bound back in read-only."""
    _check(libc.unshare(CLONE_NEWNS))
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))
    for parent, paths in mounts.items():
        held = [(path, os.open(path, os.O_PATH), os.statvfs(path).f_flag, os.path.isdir(path))
                for path in paths]
        _check(libc.mount(b"tmpfs", parent.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"))
        for path, fd, flags, is_dir in held:
            if is_dir:
                os.makedirs(path, exist_ok=True)
            else:   # a file is bound onto a file
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "a").close()
            _check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None,
                              MS_BIND | MS_REC, None))
            _check(libc.mount(b"none", path.encode(), None,
                              MS_BIND | MS_REMOUNT | MS_RDONLY | (flags & KEPT_MOUNT_FLAGS), None))
            os.close(fd)
