# Sourced by the entry scripts: re-run as root (namespaces and iptables need
# it), keeping the caller's PATH so cargo from rustup is still found.
if [ "$(id -u)" -ne 0 ]; then
  echo "legate: this needs root for network namespaces and iptables; re-running with sudo" >&2
  exec sudo --preserve-env=PATH,CARGO_HOME,RUSTUP_HOME,CARGO_TARGET_DIR "$0" "$@"
fi
cd "$(dirname "$0")/.."
