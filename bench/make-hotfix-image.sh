#!/usr/bin/env bash
# make-hotfix-image.sh - a security-hotfix-sized update on top of the images of
# ../shared/bench/make-rootfs-images.sh (run that first; this extends it):
#   v3.img  v2 + one library upgraded from Debian's security archive (a rebuilt
#           library: by default libssl3, i.e. libcrypto.so.3 and libssl.so.3) and one
#           edited configuration file (/etc/ssh/sshd_config: MaxAuthTries 3)
# Built like v1/v2: 512 MiB ext4, fixed UUID, hash seed and time, so v2 -> v3 is what a
# fleet would download for a hotfix.
# Usage: sudo make-hotfix-image.sh [OUTDIR]          (default /tmp/shoal-images)
#        LIB=zlib1g sudo make-hotfix-image.sh         (another library to upgrade)
# Needs root (chroot) and the Debian security archive (SECURITY_MIRROR, default: the
# one apt is configured with, else http://deb.debian.org/debian-security).
set -euo pipefail
OUT=${1:-/tmp/shoal-images}
SUITE=${SUITE:-bookworm}
IMG_MIB=${IMG_MIB:-512}
LIB=${LIB:-libssl3}
die() { echo "make-hotfix-image: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing (apt-get install -y e2fsprogs)"
R=$OUT/rootfs
[ -e "$R/v2/.done" ] || die "no $R/v2: run ../shared/bench/make-rootfs-images.sh $OUT first"
SECURITY_MIRROR=${SECURITY_MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(TARGET_OF) $(COMPONENT)' 2>/dev/null |
  awk -v s="$SUITE-security" '$2==s && $3=="deb" && $4=="main" {print $1; exit}')}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
tidy() { rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb
  : >"$1/etc/resolv.conf"; echo device >"$1/etc/hostname"; printf 'NAME=device\nVERSION=%s\n' "$2" >"$1/etc/device-release"; }
if [ ! -e "$R/v3/.done" ]; then
  rm -rf "$R/v3"; cp -a "$R/v2" "$R/v3"; rm -f "$R/v3/.done"
  mount -t proc proc "$R/v3/proc"; trap 'umount "$R/v3/proc" 2>/dev/null || true' EXIT
  rm -f "$R/v3/etc/resolv.conf"; cat /etc/resolv.conf >"$R/v3/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$R/v3/usr/sbin/policy-rc.d"; chmod 755 "$R/v3/usr/sbin/policy-rc.d"
  # The security archive only for this upgrade: the device's sources stay as in v2.
  SEC=$R/v3/etc/apt/sources.list.d/hotfix-security.list
  echo "deb $SECURITY_MIRROR $SUITE-security main" >"$SEC"
  CH="env LC_ALL=C DEBIAN_FRONTEND=noninteractive chroot $R/v3"
  before=$($CH dpkg-query -W -f '${Version}' "$LIB") || die "$LIB is not installed in v2"
  $CH apt-get -q update
  $CH apt-get -y -q install --only-upgrade "$LIB"
  after=$($CH dpkg-query -W -f '${Version}' "$LIB")
  [ "$before" != "$after" ] || die "$LIB has no newer version in $SUITE-security ($before); pick another LIB"
  $CH apt-get clean
  rm -f "$SEC" "$R/v3/usr/sbin/policy-rc.d"; umount "$R/v3/proc"; trap - EXIT
  # The edited configuration file.
  CONF=$R/v3/etc/ssh/sshd_config
  [ -f "$CONF" ] || die "no /etc/ssh/sshd_config in v2 (openssh-server missing)"
  if grep -q '^#\?MaxAuthTries' "$CONF"; then
    sed -i 's/^#\?MaxAuthTries.*/MaxAuthTries 3/' "$CONF"
  else
    echo 'MaxAuthTries 3' >>"$CONF"
  fi
  tidy "$R/v3" 3.0.0
  echo "make-hotfix-image: $LIB $before -> $after" >&2
  touch "$R/v3/.done"
fi
img=$OUT/v3.img
if ! { [ -e "$img" ] && [ "$img" -nt "$R/v3/.done" ]; }; then
  rm -f "$img"
  E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -b 4096 -L rootfs \
    -U 5d1b4c4e-0a70-4b3e-9d7f-000000000001 -E hash_seed=8c1f6a52-3b0e-4f58-a1d2-0000000000aa,root_owner=0:0 \
    -d "$R/v3" "$img" "${IMG_MIB}M"
fi
ls -l "$OUT"/v2.img "$img"
