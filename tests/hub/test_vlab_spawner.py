"""deploy/jupyterhub/vlab_spawner.py's way of giving students the lab's Python where it lies
under a directory they cannot enter: which directories, and the mount namespace, for real."""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SPAWNER = Path(__file__).resolve().parents[2] / "deploy" / "jupyterhub" / "vlab_spawner.py"
spec = importlib.util.spec_from_file_location("vlab_spawner", SPAWNER)
vlab_spawner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vlab_spawner)
NOBODY = 65534


@pytest.fixture
def tree():
    """open/ (0755) holding locked/ (0700) with env/lib/ below it, and public/."""
    with tempfile.TemporaryDirectory() as top:
        root = Path(top) / "open"
        (root / "locked" / "env" / "lib").mkdir(parents=True)
        (root / "public").mkdir()
        (root / "locked" / "env" / "lib" / "module.py").write_text("VALUE = 1\n")
        (root / "locked" / "secret").write_text("root's\n")
        for path in (Path(top), root, root / "public", *(root / "locked").rglob("*")):
            path.chmod(0o755)
        (root / "locked" / "env" / "lib" / "module.py").chmod(0o644)
        (root / "locked").chmod(0o700)
        yield root


def as_student(plan):
    """A preexec_fn: the spawner's mounts, then nobody's identity."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec():
        vlab_spawner.bind_into_tmpfs(libc, plan)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    return preexec


def test_paths_below_a_directory_others_cannot_enter_are_grouped_under_it(tree):
    locked = tree / "locked"
    plan = vlab_spawner.unreachable_parents(
        [str(locked / "env" / "lib"), str(tree / "public"), str(locked / "env")])
    assert plan == {str(locked): [str(locked / "env"), str(locked / "env" / "lib")]}


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace and setuid need root")
def test_a_student_sees_only_the_bound_paths_read_only(tree):
    locked = tree / "locked"
    # the probe's interpreter may lie below a directory nobody cannot enter too (pyenv's)
    plan = vlab_spawner.unreachable_parents([str(locked / "env"), sys.base_prefix, sys.prefix])

    probe = (
        "import json, os, sys\n"
        "locked, found = sys.argv[1], {}\n"
        "found['listing'] = sorted(os.listdir(locked))\n"
        "found['module'] = open(locked + '/env/lib/module.py').read()\n"
        "try:\n"
        "    open(locked + '/env/lib/new.py', 'w')\n"
        "except OSError as error:\n"
        "    found['write'] = error.strerror\n"
        "print(json.dumps(found))\n")
    run = subprocess.run([sys.executable, "-c", probe, str(locked)], preexec_fn=as_student(plan),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["listing"] == ["env"], "the rest of the directory is hidden by the tmpfs"
    assert found["module"] == "VALUE = 1\n"
    assert found["write"] == "Read-only file system"
    assert (locked / "secret").exists() and not (locked / "env" / "lib" / "new.py").exists()


def test_a_directory_others_cannot_enter_given_itself_has_its_entries_bound(tree):
    locked = tree / "locked"   # as a checkout cloned into a 0700 temporary folder
    plan = vlab_spawner.unreachable_parents([str(locked), str(locked / "env")])
    assert plan == {str(locked): [str(locked / "env"), str(locked / "secret")]}


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace and setuid need root")
def test_a_student_reads_the_files_and_directories_of_a_directory_bound_entry_by_entry(tree):
    locked = tree / "locked"
    plan = vlab_spawner.unreachable_parents([str(locked), sys.base_prefix, sys.prefix])

    probe = ("import sys\n"
             "print(open(sys.argv[1] + '/env/lib/module.py').read() + open(sys.argv[1] + '/secret').read())\n")
    (locked / "secret").chmod(0o644)
    run = subprocess.run([sys.executable, "-c", probe, str(locked)], preexec_fn=as_student(plan),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "VALUE = 1\nroot's\n\n"
