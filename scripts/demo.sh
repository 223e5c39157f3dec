#!/usr/bin/env bash
# The main job: builds legate and runs a local demo mesh in network
# namespaces, with the embedded CA. Installs missing Debian packages first.
set -euo pipefail
source "$(dirname "$0")/root.sh"

scripts/deps.sh demo
cargo build --release --locked
exec target/release/legate demo "$@"
