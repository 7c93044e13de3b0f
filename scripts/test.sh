#!/usr/bin/env bash
# Runs every test: installs what is missing, then `cargo test`. Each test
# starts its own redis-server on a free loopback port, so nothing else needs
# to be running.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --all-targets "$@"
