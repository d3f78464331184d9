#!/usr/bin/env bash
# A second QEMU beside the system's: the Debian backports suite's QEMU, unpacked (dpkg -x) into
# .tools/qemu-backports, with wrappers in its bin/ that point it at its own modules and firmware.
# The system's package sources are left as they are: apt reads a sources file of our own
# (the configured Debian mirror, its backports suite) with lists and caches under .tools/apt.
# Idempotent. Prints the prefix.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=$PWD/.tools/qemu-backports
if [ -x "$PREFIX/bin/qemu-system-x86_64" ] && "$PREFIX/bin/qemu-system-x86_64" --version >/dev/null 2>&1; then
  echo "$PREFIX"; exit 0
fi
. /etc/os-release
CODENAME=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
# The configured mirror: where the release's main component comes from.
MIRROR=$(apt-cache policy | awk -v s="$CODENAME/main" '$3 == s {print $2; exit}')
[ -n "$MIRROR" ] || { echo "qemu-backports: no configured package source for $CODENAME/main" >&2; exit 1; }
APT=$PWD/.tools/apt
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/sources.d" "$APT/debs"
cat > "$APT/sources.list" <<SOURCES
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $CODENAME-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $CODENAME main
SOURCES
OPTS=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/sources.d"
      -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "Debug::NoLocking=1"
      -o "APT::Get::List-Cleanup=0")
apt-get "${OPTS[@]}" update -qq
PKGS=(qemu-system-x86 qemu-system-data qemu-system-common qemu-utils qemu-block-extra seabios ipxe-qemu)
rm -f "$APT"/debs/*.deb
( cd "$APT/debs" && apt-get "${OPTS[@]}" download -qq -t "$CODENAME-backports" "${PKGS[@]}" )
rm -rf "$PREFIX"
mkdir -p "$PREFIX/bin"
for deb in "$APT"/debs/*.deb; do dpkg -x "$deb" "$PREFIX"; done
for tool in qemu-system-x86_64 qemu-img qemu-io; do
  cat > "$PREFIX/bin/$tool" <<WRAPPER
#!/bin/sh
export QEMU_MODULE_DIR=$PREFIX/usr/lib/x86_64-linux-gnu/qemu
exec $PREFIX/usr/bin/$tool $( [ $tool = qemu-system-x86_64 ] && echo "-L $PREFIX/usr/share/qemu -L $PREFIX/usr/share/seabios" ) "\$@"
WRAPPER
  chmod +x "$PREFIX/bin/$tool"
done
"$PREFIX/bin/qemu-system-x86_64" --version >/dev/null
echo "$PREFIX"
