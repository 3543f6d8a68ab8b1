#!/usr/bin/env bash
# Prepare a machine for vlab: system packages, then a virtual environment with the package.
# Usage: tools/setup.sh lab|hub|test   (hub adds JupyterHub and its proxy for a class,
# deploy/jupyterhub; test is both, with Chromium for the browser tier)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-lab}
case $profile in lab|hub|test) ;; *) echo "usage: tools/setup.sh lab|hub|test" >&2; exit 2 ;; esac

# gcc, Python's headers and <linux/kvm.h> build vlab's compiled parts, the VM-exit path and the run loop (setup.py);
# libtraceevent1 and libtracefs1 decode KVM's tracepoints (vlab.kvm.kernel_trace); busybox-static
# is the userspace of Linux guests' initramfs (vlab.machine.initramfs)
apt_packages=(nasm python3-venv gcc python3-dev libc6-dev linux-libc-dev libtraceevent1 libtracefs1
              busybox-static)
[ "$profile" = test ] && apt_packages+=(chromium)
# JupyterHub's proxy (configurable-http-proxy) runs on Node.js
if [ "$profile" != lab ] && ! command -v npm >/dev/null; then apt_packages+=(nodejs npm); fi

missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# A Python that is not Debian's (pyenv, conda) brings its own venv module.
if python3 -c 'import venv, ensurepip' 2>/dev/null; then
  missing=("${missing[@]/python3-venv}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ ${#missing[@]} -gt 0 ]; then
  echo "vlab setup: installing system packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "vlab setup: creating .venv"
  python3 -m venv .venv
fi
# pip runs only when what it installs from changed since the last set-up (so a set-up
# machine works offline): the stamp holds the extra and a hash of the build files.
extra=$profile
stamp=.venv/.vlab-setup
inputs=$(cat pyproject.toml setup.py vlab/kvm/_exitpath.c vlab/machine/_runloop.c vlab/accel/tcg/_insnhooks.c | sha256sum | cut -d' ' -f1)
read -r done_extra done_inputs < "$stamp" 2>/dev/null || true
if [ "${done_inputs:-}" = "$inputs" ] && { [ "$done_extra" = "$extra" ] || [ "$done_extra" = test ]; }; then
  echo "vlab setup: .venv is up to date (vlab[$done_extra])"
else
  echo "vlab setup: installing vlab[$extra] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extra]"
  echo "$extra $inputs" > "$stamp"
fi
# JupyterHub's proxy from npm, into .venv/bin, where deploy/jupyterhub's config looks first
# (4.6 runs on Debian 12's Node.js 18; 5.x needs Node.js 20)
chp_version=4.6.3
if [ "$profile" != lab ] && [ "$(.venv/bin/configurable-http-proxy --version 2>/dev/null)" != "$chp_version" ]; then
  echo "vlab setup: installing configurable-http-proxy $chp_version into .venv"
  npm install -s --no-audit --no-fund --prefix .venv/lib/node "configurable-http-proxy@$chp_version"
  ln -sfn ../lib/node/node_modules/.bin/configurable-http-proxy .venv/bin/configurable-http-proxy
fi
# Voila's page template for the dashboard (voila.json names it), where Voila looks for them
mkdir -p .venv/share/jupyter/voila/templates
ln -sfn "$PWD/share/jupyter/voila/templates/vlab" .venv/share/jupyter/voila/templates/vlab
