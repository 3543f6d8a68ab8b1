"""A busybox initramfs for Linux guests, built from Debian's busybox-static.

The kernel unpacks an initramfs (a newc cpio archive, possibly gzipped:
Documentation/driver-api/early-userspace/buffer-format.rst) into its root file system
and runs `/init`. This one holds a statically linked busybox (Debian's `busybox-static`,
installed with apt when missing: no other download), a link per applet in /bin, the
/dev/console node the kernel opens for init's stdin/stdout before /init runs, and /init:

- "check" (default): mount /proc and /sys, print MARKER, the first lines of /proc/cpuinfo,
  then POWEROFF_MARKER and `poweroff -f` (the reboot(2) syscall at once: no init system to
  stop). How the machine ends the run then is the PC's business (vlab.machine.pc).
- "shell": the same mounts, MARKER, then a shell with the serial console as its
  controlling terminal (`setsid cttyhack sh`, so job control and Ctrl-C work); leaving it
  powers off.

The archive is reproducible (inode numbers in order, every mtime 0, gzip without a time
stamp) and cached by the hash of what it holds; standard library only (the SVM test host's
harness uses `cpio_newc` with the system's Python).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
from pathlib import Path
from typing import NamedTuple

from .debian_kernel import cache_dir, install_packages

MARKER = "vlab-init: reached /init"           # the line a test waits for
POWEROFF_MARKER = "vlab-init: poweroff -f"    # printed just before /init powers off
BUSYBOX = Path("/bin/busybox")                # Debian's busybox-static puts it there
BUSYBOX_PACKAGE = "busybox-static"
CPUINFO_LINES = 8

DIR, FILE, DATA, LINK, CHAR = 0o040755, 0o100755, 0o100644, 0o120777, 0o020600   # cpio modes

PROLOGUE = """#!/bin/sh
# vlab's /init: busybox is the whole userspace.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "{marker}"
echo "vlab-init: kernel $(uname -r), command line: $(cat /proc/cmdline)"
"""
INIT_SCRIPTS = {
    "check": PROLOGUE + """head -n {lines} /proc/cpuinfo
echo "{poweroff}"
poweroff -f
""",
    "shell": PROLOGUE + """echo "vlab-init: a shell on the serial console; exit powers off"
setsid cttyhack sh
echo "{poweroff}"
poweroff -f
""",
}


class CpioEntry(NamedTuple):
    """One file of a newc archive: its path (no leading /), mode (type and permissions),
    contents (a symlink's target), and for a device node its (major, minor)."""
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: list[tuple]) -> bytes:
    """A newc cpio archive (magic 070701, 13 hex fields, the name, then the data, each
    padded to 4 bytes) of (path, mode, data[, rdev]) entries, ending with TRAILER!!!."""
    out = bytearray()
    for ino, entry in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        name, mode, data, (major, minor) = CpioEntry(*entry)
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(name) + 1, 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def busybox(log=print) -> Path:
    """The static busybox, apt-installing busybox-static if it is missing."""
    if not BUSYBOX.exists():
        install_packages((BUSYBOX_PACKAGE,), log)
    return BUSYBOX


def init_script(variant: str = "check") -> str:
    if variant not in INIT_SCRIPTS:
        raise ValueError(f"initramfs variant {variant!r}: choose one of "
                         f"{', '.join(INIT_SCRIPTS)}")
    return INIT_SCRIPTS[variant].format(marker=MARKER, poweroff=POWEROFF_MARKER,
                                        lines=CPUINFO_LINES)


def initramfs_entries(busybox_binary: bytes, applets: list[str], init: str) -> list[CpioEntry]:
    """The archive's files: directories, /dev/console (5, 1), busybox and its applet links,
    /init."""
    entries = [CpioEntry(d, DIR) for d in ("bin", "dev", "proc", "sys", "tmp", "root")]
    entries.append(CpioEntry("dev/console", CHAR, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", FILE, busybox_binary))
    entries += [CpioEntry(f"bin/{a}", LINK, b"busybox") for a in sorted(set(applets))
                if a != "busybox"]
    entries.append(CpioEntry("init", FILE, init.encode()))
    return entries


def build_initramfs(variant: str = "check", cache: Path | None = None, log=print,
                    init: str | None = None) -> Path:
    """The gzipped initramfs of `variant` ("check" or "shell"), or with `init` as its /init
    (a script of one's own, e.g. PROLOGUE then what to probe), built once per busybox binary
    and script into `cache` (default vlab's cache dir, initramfs/)."""
    if init is None:
        init = init_script(variant)
    else:
        variant = "custom"
    path = busybox(log)
    binary = path.read_bytes()
    applets = subprocess.run([str(path), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    key = hashlib.sha256(binary + init.encode()).hexdigest()[:16]
    dest = (cache or cache_dir()) / "initramfs" / f"busybox-{variant}-{key}.cpio.gz"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    archive = cpio_newc(initramfs_entries(binary, applets, init))
    staged = dest.with_suffix(f".{os.getpid()}.tmp")
    staged.write_bytes(gzip.compress(archive, 9, mtime=0))
    os.replace(staged, dest)   # one step: another process may build it at once
    return dest
