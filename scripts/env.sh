# Sourced by vmpod's scripts: a toolchain on PATH and strict mode.
set -euo pipefail
# rustup installs cargo in ~/.cargo/bin, which a non-login shell may lack.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "vmpod: cargo is not installed; install a Rust toolchain (1.85 or newer) with rustup" >&2
    exit 1
fi
VMPOD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VMPOD_ROOT
# Cargo's target dir (CARGO_TARGET_DIR, relative to the workspace when relative).
VMPOD_TARGET=${CARGO_TARGET_DIR:-$VMPOD_ROOT/target}
case $VMPOD_TARGET in /*) ;; *) VMPOD_TARGET=$VMPOD_ROOT/$VMPOD_TARGET ;; esac
export VMPOD_TARGET
cd "$VMPOD_ROOT"
