#!/usr/bin/env bash
# Set up everything pytest-kvmcheck needs on a fresh Debian/Ubuntu machine:
# QEMU and image tools from the system's configured package sources (only what is
# missing), then the package in a virtualenv (.venv). Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-system-x86 qemu-utils busybox-static dropbear-bin pciutils iproute2 kmod procps
          openssh-server openssh-client socat python3-venv ca-certificates sudo
          gcc libc6-dev \
          mmdebstrap extlinux syslinux-common e2fsprogs mount \
          chromium)  # gcc: the guest's KVM probe; mmdebstrap..mount: images; chromium: the reports' browser checks
command -v npm >/dev/null || PACKAGES+=(nodejs npm)  # the Allure 3 command line (npm package "allure")

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# The tiny guest's kernel is fetched with 'apt-get download': the package lists must be there.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache policy linux-image-amd64 2>/dev/null | grep -q "Candidate: [0-9]"; then
  echo "setup: apt-get update"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[lint]'
if [ ! -x .tools/node_modules/.bin/allure ]; then
  echo "setup: installing the Allure 3 command line (npm package allure) in .tools"
  npm install --silent --no-fund --no-audit --prefix .tools allure@3 >/dev/null
fi
echo "setup: a second QEMU, Debian's backports one, unpacked in .tools/qemu-backports"
bash scripts/qemu-backports.sh >/dev/null
echo "setup: building (or reusing) the tiny guest image"
.venv/bin/kvmcheck image build >/dev/null
echo "setup: done"
