"""A Debian kernel to boot: found in /boot, or fetched with apt into a cache.

`linux_kernel()` is what `vlab linux-kernel` prints: the bzImage (boot/vmlinuz-VERSION) of
the linux-image package apt's meta-packages point at, from /boot when that file is there and
readable, else fetched with `apt-get download` and unpacked with `dpkg-deb -x` into the cache
(~/.cache/vlab/linux/PACKAGE, or $VLAB_CACHE/linux/PACKAGE). Nothing comes from anywhere but
apt's own sources. The SVM test host (tools/svm-host) takes its kernel from the same
functions, so vlab and that host boot the same kernel.

Standard library only: the SVM host's harness runs this with the system's Python.
"""
from __future__ import annotations

import lzma
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

# Meta-packages, closest to today's hosts first: Debian 12 has linux-image-6.12-amd64
# besides its 6.1 linux-image-amd64.
KERNEL_SERIES = ("linux-image-6.12-amd64", "linux-image-amd64")
CACHE_ENV = "VLAB_CACHE"
SUDO = [] if os.geteuid() == 0 else ["sudo"]


class KernelPackageError(Exception):
    """apt could not give the kernel (or a tool it needs), and why."""


def cache_dir() -> Path:
    """vlab's cache: $VLAB_CACHE, else $XDG_CACHE_HOME/vlab, else ~/.cache/vlab."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vlab"


def run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    """Run a tool; a failure or a 15-minute stall raises KernelPackageError with its last
    lines of output."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    except subprocess.TimeoutExpired:
        raise KernelPackageError(f"{what} took more than 900 s ({shlex.join(cmd)})") from None
    except FileNotFoundError:
        raise KernelPackageError(f"{what}: {cmd[0]} not found (Debian or Ubuntu's apt and "
                                 "dpkg are needed)") from None
    if proc.returncode:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise KernelPackageError(f"{what} failed ({shlex.join(cmd)}):\n  " + "\n  ".join(detail))
    return proc


def install_packages(packages: tuple[str, ...], log=print) -> None:
    """apt-get install the Debian packages that are not installed yet (as tools/setup.sh)."""
    missing = [pkg for pkg in packages if "install ok installed" not in subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True).stdout]
    if not missing:
        return
    log(f"installing {' '.join(missing)} (apt)")
    run(SUDO + ["apt-get", "update", "-qq"], "apt-get update")
    run(SUDO + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        f"installing {' '.join(missing)}", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def kernel_package(package: str | None = None) -> str:
    """The linux-image package to boot: `package`, else what the first of KERNEL_SERIES
    that apt knows depends on (apt's lists are fetched once if it knows none)."""
    if package:
        return package
    for attempt in range(2):
        for meta in KERNEL_SERIES:
            out = subprocess.run(["apt-cache", "depends", meta], capture_output=True,
                                 text=True).stdout
            found = re.findall(r"Depends: (linux-image-[^\s<>]+)", out)
            if found:
                return found[0]
        if attempt == 0:   # package lists never fetched (a fresh container)
            run(SUDO + ["apt-get", "update", "-qq"], "apt-get update")
    raise KernelPackageError("apt offers no linux-image-amd64 package: check `apt-cache "
                             "search linux-image` and name one")


def unpack_package(package: str, dest: Path, log=print) -> Path:
    """`apt-get download` the package into `dest` and unpack it there (`dpkg-deb -x`);
    returns the unpacked tree."""
    log(f"downloading {package} (apt-get download, ~110 MB)")
    run(["apt-get", "download", package], f"downloading {package}", cwd=dest)
    deb = next(dest.glob("*.deb"))
    tree = dest / "tree"
    run(["dpkg-deb", "-x", str(deb), str(tree)], f"unpacking {deb.name}")
    deb.unlink()
    return tree


def linux_kernel(package: str | None = None, cache: Path | None = None, log=print) -> Path:
    """The path of the package's bzImage: /boot/vmlinuz-VERSION if readable, else the
    cached copy, fetched on first use."""
    package = kernel_package(package)
    version = package.removeprefix("linux-image-")
    installed = Path("/boot") / f"vmlinuz-{version}"
    if os.access(installed, os.R_OK):
        return installed
    bzimage = (cache or cache_dir()) / "linux" / package / "vmlinuz"
    if bzimage.exists():
        return bzimage
    bzimage.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bzimage.parent) as tmp:
        return store_bzimage(package, unpack_package(package, Path(tmp), log), cache)


def store_bzimage(package: str, tree: Path, cache: Path | None = None) -> Path:
    """Keep the bzImage of an unpacked package (`unpack_package`) where `linux_kernel`
    finds it."""
    found = next(tree.glob("boot/vmlinuz-*"), None)
    if found is None:
        raise KernelPackageError(f"{package} holds no boot/vmlinuz")
    bzimage = (cache or cache_dir()) / "linux" / package / "vmlinuz"
    bzimage.parent.mkdir(parents=True, exist_ok=True)
    staged = bzimage.with_suffix(f".{os.getpid()}.tmp")
    shutil.copyfile(found, staged)
    os.replace(staged, bzimage)   # one step: another process may fetch it at once
    return bzimage


def linux_vmlinux(package: str | None = None, cache: Path | None = None, log=print) -> Path:
    """The ELF vmlinux inside the package's bzImage (`extract_vmlinux`), extracted into
    the cache on first use."""
    package = kernel_package(package)
    elf = (cache or cache_dir()) / "linux" / package / "vmlinux"
    if not elf.exists():
        bzimage = linux_kernel(package, cache, log)
        elf.parent.mkdir(parents=True, exist_ok=True)
        staged = elf.with_suffix(f".{os.getpid()}.tmp")
        staged.write_bytes(extract_vmlinux(bzimage.read_bytes()))
        os.replace(staged, elf)
    return elf


def unzstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True).stdout


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage's compressed payload (xz, gzip or zstd), found by
    its magic as scripts/extract-vmlinux does: booted through its PVH note it skips the
    decompression (seconds instead of ~40 s under an emulated CPU)."""
    for magic, unpack in ((b"\xfd7zXZ\x00", lambda d: lzma.LZMADecompressor().decompress(d)),
                          (b"\x1f\x8b\x08", lambda d: zlib.decompressobj(31).decompress(d)),
                          (b"\x28\xb5\x2f\xfd", unzstd)):
        at = bzimage.find(magic)
        while at >= 0:
            try:
                elf = unpack(bzimage[at:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if elf[:4] == b"\x7fELF":
                return elf
            at = bzimage.find(magic, at + 1)
    raise KernelPackageError("no ELF kernel found inside the bzImage's payload")
