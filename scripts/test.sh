#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, integration and end-to-end
# tests in network namespaces. Installs missing Debian packages first.
set -euo pipefail
source "$(dirname "$0")/root.sh"

scripts/deps.sh test
echo "legate: cargo fmt --check" >&2
cargo fmt --all -- --check
echo "legate: cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "legate: cargo doc" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
echo "legate: cargo test" >&2
cargo test --workspace --locked "$@"
