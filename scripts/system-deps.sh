#!/usr/bin/env bash
# Install the Debian packages a make target needs, only those missing (idempotent).
# Usage: scripts/system-deps.sh test|bench
set -euo pipefail
case "${1:-test}" in
  test)  packages=(nix-bin) ;;         # real Nix to compare store paths and NARs with
  bench) packages=(nix-bin time nginx-light wrk curl) ;;  # peers: nix-store, nginx; GNU time; load clients
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
