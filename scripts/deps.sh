#!/usr/bin/env bash
# Installs the Debian packages a legate task needs, only those missing.
# Usage: scripts/deps.sh test|demo|bench
set -euo pipefail

need=()
# Each line: command package purpose
declare -A groups
groups[base]="
ip iproute2 network-namespaces
iptables iptables interception-rules
iptables-legacy iptables legacy-iptables-backend
tcpdump tcpdump packet-captures
curl curl HTTP-client
openssl openssl certificate-checks
pgrep procps process-checks
"
groups[test]="
redis-server redis-server a-real-TCP-server
redis-cli redis-tools a-real-TCP-client
"
groups[demo]=""
groups[bench]="
wrk wrk HTTP/1.1-load
h2load nghttp2-client HTTP/2-load
nginx nginx comparison-proxy
haproxy haproxy comparison-proxy
"

want=${1:-test}
lines="${groups[base]}${groups[$want]:-}"
if [ "$want" = bench ]; then lines="$lines${groups[test]}"; fi

while read -r cmd pkg why; do
  [ -n "${cmd:-}" ] || continue
  if ! command -v "$cmd" >/dev/null 2>&1 && [[ ! " ${need[*]:-} " =~ " $pkg " ]]; then
    echo "legate: installing $pkg (for ${why//-/ }: '$cmd' is missing)" >&2
    need+=("$pkg")
  fi
done <<<"$lines"

# nginx's stream module is a separate package on Debian.
if [ "$want" = bench ] && [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
  echo "legate: installing libnginx-mod-stream (for the nginx stream comparison)" >&2
  need+=(libnginx-mod-stream)
fi

if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
