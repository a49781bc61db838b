#!/usr/bin/env bash
# Install the Debian packages a make target needs, only those missing (idempotent).
# Usage: scripts/system-deps.sh test|bench
set -euo pipefail
case "${1:-test}" in
  test)  packages=(nix-bin fuse3 gcc python3-dev postgresql openssh-server qemu-system-x86 linux-image-amd64 busybox-static) ;;  # real Nix; FUSE mounts (fusermount3); PostgreSQL server; sshd (ssh-ng:// test); a VM over virtio-fs
  bench) packages=(nix-bin postgresql time fuse3 gcc python3-dev casync borgbackup nginx-light wrk curl) ;;  # peers: nix-store, casync, borg, nginx; GNU time; load clients; FUSE
  *) echo "system-deps: unknown profile $1" >&2; exit 2 ;;
esac
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "system-deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
