#!/usr/bin/env bash
# The benchmarks: legate's L4 and HTTP data plane against direct
# connections and nginx / HAProxy mTLS pairs, all in test-bed namespaces,
# in one run. Installs missing Debian packages, builds release binaries,
# runs every peer and prints the tables (Markdown, as recorded in
# benches/RESULTS.md). Takes 10 to 20 minutes.
#
# Extra arguments go to legate-bench, for example:
#   scripts/bench.sh --suite l4 --seconds 5
#   scripts/bench.sh --peers legate --profile prof   (needs linux-perf)
#   scripts/bench.sh --help
set -euo pipefail
source "$(dirname "$0")/root.sh"

scripts/deps.sh bench
echo "legate: cargo build --release (legate, legate-bench)" >&2
cargo build --release --locked -p legate -p legate-bench
exec "${CARGO_TARGET_DIR:-target}/release/legate-bench" "$@"
