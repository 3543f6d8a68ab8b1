"""The deployments that cannot run here, checked for what can be: deploy/k8s/values.yaml
against the Zero to JupyterHub chart's values schema (no cluster here: not installed), the
container's start script for real, and the container and Binder recipes against what
tools/setup.sh and pyproject.toml install (the image is not built by the tests: its base image
cannot be pulled from the test machines)."""
from __future__ import annotations

import os
import re
import subprocess
from importlib.metadata import metadata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "deploy" / "k8s" / "values.yaml"
CONTAINERFILE = REPO / "deploy" / "container" / "Containerfile"
START = REPO / "deploy" / "container" / "start-vlab"

# Property names from the chart's values.schema.yaml (jupyterhub/zero-to-jupyterhub-k8s,
# chart 4.x), where each of these objects has additionalProperties: false
Z2JH = {
    "": {"enabled", "fullnameOverride", "nameOverride", "imagePullSecret", "imagePullSecrets",
         "hub", "proxy", "singleuser", "scheduling", "ingress", "prePuller", "custom", "cull",
         "debug", "rbac", "global"},
    "singleuser": {"networkPolicy", "podNameTemplate", "cpu", "memory", "image", "initContainers",
                   "profileList", "extraFiles", "extraEnv", "nodeSelector", "extraTolerations",
                   "extraNodeAffinity", "extraPodAffinity", "extraPodAntiAffinity",
                   "cloudMetadata", "cmd", "defaultUrl", "events", "extraAnnotations",
                   "extraContainers", "extraLabels", "extraPodConfig", "extraResource", "fsGid",
                   "lifecycleHooks", "networkTools", "serviceAccountName", "startTimeout",
                   "storage", "allowPrivilegeEscalation", "uid"},
    "singleuser.image": {"name", "tag", "pullPolicy", "pullSecrets"},
    "singleuser.cpu": {"limit", "guarantee"},
    "singleuser.memory": {"limit", "guarantee"},
    "singleuser.storage": {"capacity", "dynamic", "extraLabels", "extraVolumeMounts",
                           "extraVolumes", "homeMountPath", "static", "type"},
    "cull": {"enabled", "users", "adminUsers", "removeNamedServers", "timeout", "every",
             "concurrency", "maxAge"},
}
KVM_RESOURCE = re.compile(r"(^|/)kvm$")   # a device plugin's resource for /dev/kvm


def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def at(tree: dict, dotted: str):
    for key in filter(None, dotted.split(".")):
        tree = tree[key]
    return tree


def test_k8s_values_use_only_the_charts_keys():
    tree = values()
    for path, allowed in Z2JH.items():
        try:
            keys = set(at(tree, path))
        except KeyError:
            continue
        assert keys <= allowed, f"{path or 'top level'}: not in the chart's schema: {keys - allowed}"


def test_k8s_values_types_follow_the_schema():
    tree = values()
    single = tree["singleuser"]
    assert isinstance(single["image"]["name"], str) and isinstance(single["image"]["tag"], str)
    assert all(isinstance(single["cpu"][k], (int, float)) for k in single["cpu"])
    assert all(isinstance(single["memory"][k], (int, str)) for k in single["memory"])
    assert all(isinstance(value, str) for value in single["extraEnv"].values())
    assert isinstance(single["cmd"], list) and isinstance(single["profileList"], list)
    assert tree["cull"]["enabled"] is True
    assert isinstance(tree["cull"]["timeout"], int) and isinstance(tree["cull"]["every"], int)


def test_k8s_profiles_offer_kvm_and_fall_back_to_tcg():
    """One profile asks a device plugin for /dev/kvm (so it lands only on KVM nodes); one asks
    for nothing, so it runs anywhere and vlab's accel="auto" picks tcg there."""
    profiles = values()["singleuser"]["profileList"]
    kvm, tcg = [], []
    for profile in profiles:
        assert profile["display_name"] and profile["description"]
        limits = profile.get("kubespawner_override", {}).get("extra_resource_limits", {})
        (kvm if any(KVM_RESOURCE.search(name) for name in limits) else tcg).append(profile)
    assert len(kvm) == 1 and kvm[0].get("default") is True
    assert kvm[0]["kubespawner_override"]["supplemental_gids"], "the pod joins /dev/kvm's group"
    assert len(tcg) == 1


def test_start_script_copies_the_lessons_once_and_runs_the_server(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), VLAB_NOTEBOOKS=str(REPO / "notebooks"))
    run = subprocess.run([str(START), "echo", "server"], env=env, capture_output=True, text=True,
                         check=True)
    assert run.stdout == "server\n"
    lessons = tmp_path / "vlab-notebooks"
    assert sorted(p.name for p in lessons.glob("*.ipynb")) == \
        sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
    edited = lessons / "01-accel-init.ipynb"
    edited.write_text("the student's own work")
    subprocess.run([str(START), "true"], env=env, check=True)
    assert edited.read_text() == "the student's own work"


def setup_apt_packages() -> set[str]:
    """What tools/setup.sh installs from apt for every profile."""
    line = re.search(r"^apt_packages=\(([^)]*)\)", (REPO / "tools" / "setup.sh").read_text(), re.M)
    return set(line.group(1).split())


def test_container_and_binder_install_what_setup_installs():
    extras = metadata("vlab").get_all("Provides-Extra")
    recipe = CONTAINERFILE.read_text()
    apt = re.search(r"apt-get install -y --no-install-recommends ([^&]*)&&", recipe, re.S)
    # the image's Python brings its own venv and headers
    assert set(apt.group(1).replace("\\", " ").split()) == setup_apt_packages() - {"python3-venv", "python3-dev"}
    binder_apt = set((REPO / "binder" / "apt.txt").read_text().split())
    assert binder_apt <= setup_apt_packages() and "nasm" in binder_apt
    for text in (recipe, (REPO / "binder" / "postBuild").read_text()):
        named = re.findall(r'\.\[(\w+)\]"', text)
        assert named and set(named) <= set(extras), named
    assert "start-vlab" in values()["singleuser"]["cmd"]
    assert f"COPY deploy/container/{START.name} " in recipe
