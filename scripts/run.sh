#!/usr/bin/env bash
# `make run`: import examples/ into the store as a store path, say what to try, then serve the store
# over gRPC and as a Nix binary cache until Ctrl-C.
#
# Environment: NIXCAS (the nixcas command; default: nixcas), LISTEN (gRPC, default 127.0.0.1:8000),
# BRIDGE_LISTEN (binary cache, default 127.0.0.1:9000), BRIDGE_ARGS (more bridge options, e.g.
# --allow-writes or --token-file F), NIXCAS_STORE_DIR (the store; default ~/.local/share/nixcas).
set -euo pipefail
cd "$(dirname "$0")/.."
nixcas=${NIXCAS:-nixcas}
listen=${LISTEN:-127.0.0.1:8000}
bridge=${BRIDGE_LISTEN:-127.0.0.1:9000}
read -r -a bridge_args <<<"${BRIDGE_ARGS:-}"

path=$("$nixcas" import examples)
cache="http://$bridge"
try="nix --extra-experimental-features nix-command"
uploads="Uploads are off. To allow them: make run BRIDGE_ARGS=--allow-writes (anyone who can reach $bridge
may write), or BRIDGE_ARGS='--token-file FILE' (lines 'write TOKEN NAME'; Nix sends the token from a
netrc-file: 'machine ${bridge%:*} login nix password TOKEN'); then: $try copy --to $cache /nix/store/…"
for arg in "${bridge_args[@]}"; do
  case $arg in
    --allow-writes) uploads="Uploads are open to anyone who can reach $bridge: $try copy --to $cache /nix/store/…" ;;
    --token-file) uploads="Uploads need a write token of the token file (Nix: netrc-file with 'machine ${bridge%:*} login nix password TOKEN')." ;;
  esac
done
cat <<MSG
examples/ is now the store path $path
Serving it over gRPC (grpc+http://$listen) and as a Nix binary cache ($cache); Ctrl-C stops.
Try, in another shell:
  $try path-info --store $cache $path
  $try copy --from $cache --no-check-sigs --store /tmp/nixcas-try $path   # into a throw-away store
  $try store ls --store $cache -R $path
  $nixcas path-info $path
$uploads
MSG
exec "$nixcas" daemon --listen-address "$listen" --nar-bridge "$bridge" "${bridge_args[@]}"
