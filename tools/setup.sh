#!/usr/bin/env bash
# Prepare a machine for vlab: system packages, then a virtual environment with the package.
# Usage: tools/setup.sh lab|test   (test also installs Chromium for the browser tier)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-lab}

# gcc, Python's headers and <linux/kvm.h> build vlab's compiled VM-exit path (setup.py);
# libtraceevent1 and libtracefs1 decode KVM's tracepoints (vlab.kvm.kernel_trace)
apt_packages=(nasm python3-venv gcc python3-dev libc6-dev linux-libc-dev libtraceevent1 libtracefs1)
[ "$profile" = test ] && apt_packages+=(chromium)

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
extra=$([ "$profile" = test ] && echo test || echo lab)
stamp=.venv/.vlab-setup
inputs=$(cat pyproject.toml setup.py vlab/kvm/_exitpath.c | sha256sum | cut -d' ' -f1)
read -r done_extra done_inputs < "$stamp" 2>/dev/null || true
if [ "${done_inputs:-}" = "$inputs" ] && { [ "$done_extra" = "$extra" ] || [ "$done_extra" = test ]; }; then
  echo "vlab setup: .venv is up to date (vlab[$done_extra])"
else
  echo "vlab setup: installing vlab[$extra] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extra]"
  echo "$extra $inputs" > "$stamp"
fi
# Voila's page template for the dashboard (voila.json names it), where Voila looks for them
mkdir -p .venv/share/jupyter/voila/templates
ln -sfn "$PWD/share/jupyter/voila/templates/vlab" .venv/share/jupyter/voila/templates/vlab
