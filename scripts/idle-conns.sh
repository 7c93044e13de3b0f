#!/usr/bin/env bash
# Measures what idle clients cost the proxy: starts a redis-server and
# redcloak (plaintext listener, values sealed), opens COUNT connections from
# one Python process, authenticates each, runs SET/GET on a few and leaves
# them all idle, then prints the proxy's RSS, the RSS per connection and how
# many connections the proxy holds to Redis. The goal is 10000 connections
# in at most 200 MiB.
#
#   scripts/idle-conns.sh [COUNT]     (default: 10000)
set -euo pipefail
cd "$(dirname "$0")/.."

count=${1:-10000}
if ! [[ "$count" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/idle-conns.sh [COUNT]" >&2
  exit 2
fi

scripts/install-deps.sh
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/redcloak"

# Every process started below inherits this limit. The Python client holds
# COUNT sockets; the proxy COUNT client sockets and, while each session has
# its own upstream link, up to COUNT more. Without the privilege to raise
# the hard limit, the soft one goes as high as it allows.
want=$((2 * count + 1024))
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=$want
ulimit -n "$want" 2>/dev/null || ulimit -n "$hard"
if [ "$(ulimit -n)" -lt $((count + 256)) ]; then
  echo "idle-conns.sh: the open-files limit is $(ulimit -n), too low for $count connections; run as root or lower COUNT" >&2
  exit 1
elif [ "$(ulimit -n)" -lt "$want" ]; then
  echo "idle-conns.sh: open-files limit $(ulimit -n), below the $want wanted; a proxy with an upstream link per session may run out" >&2
fi
maxclients=$((2 * count > 20000 ? 2 * count : 20000))

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits until "$@" succeeds, failing if process $1 dies or 10 s pass.
wait_until() { # pid, log, command...
  local pid=$1 log=$2
  shift 2
  for _ in $(seq 100); do
    "$@" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "idle-conns.sh: process $pid did not come up; its log:" >&2
  cat "$log" >&2
  exit 1
}
redis_answers() { [[ "$(redis-cli -p "$1" ping 2>&1)" == PONG ]]; }
proxy_answers() { [[ "$(redis-cli -p "$1" ping 2>&1)" == *NOAUTH* ]]; }

echo "command:  scripts/idle-conns.sh $count"
echo "machine:  $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --maxclients "$maxclients" --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
wait_until "$redis_pid" "$work/redis.log" redis_answers "$redis_port"
# Redis lowers maxclients itself when the open-files limit is short of it.
echo "limits:   open files $(ulimit -n), redis-server maxclients $(redis-cli -p "$redis_port" config get maxclients | tail -n 1), proxy max_connections $((count + 100))"
echo

# Few PBKDF2 iterations, so that COUNT logins take seconds, not minutes.
hash=$(printf 'idle-pw\n' | "$bin" hash-password --iterations 1000)
proxy_port=$(free_port)
cat >"$work/proxy.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy_port"
max_connections = $((count + 100))
[upstream]
address = "127.0.0.1:$redis_port"
[encryption]
enabled = true
key = "$(head -c 32 /dev/urandom | base64)"
[audit]
enabled = false
[[users]]
name = "default"
password_hash = "$hash"
project = "idle"
access = "readwrite"
TOML
RUST_LOG=warn "$bin" serve --config "$work/proxy.toml" >/dev/null 2>"$work/proxy.log" &
proxy_pid=$!
pids+=("$proxy_pid")
wait_until "$proxy_pid" "$work/proxy.log" proxy_answers "$proxy_port"

python3 scripts/idle_conns.py --port "$proxy_port" --password idle-pw --count "$count" \
  --proxy-pid "$proxy_pid" --redis-port "$redis_port"
