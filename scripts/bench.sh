#!/usr/bin/env bash
# Benchmarks redcloak against Redis directly, in the same run: for each
# scenario, redis-benchmark runs against redis-server, then through the proxy
# with namespacing only, then with encryption on, then with encryption and
# an access event per command in the audit log, and prints requests per
# second, p50/p99 latency and the ratio to direct Redis. Speed is measured
# here, never asserted in tests.
#
#   scripts/bench.sh [REQUESTS] [REPEATS]     (defaults: 100000, 1)
#
# With REPEATS > 1 each run is repeated and the median is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --quiet

requests=${1:-100000}
repeats=${2:-1}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$work" --daemonize no >/dev/null 2>&1 &
pids+=($!)
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.1; done

# One benchmark user; the hash carries a low iteration count so that the
# benchmark's 50 connections don't measure PBKDF2.
hash=$(printf 'bench-pw\n' | target/release/redcloak hash-password --iterations 1000)
key=$(head -c 32 /dev/urandom | base64)

# Starts a proxy and sets proxy_port and proxy_pid.
start_proxy() { # name, encryption section, [audit section]
  local port
  port=$(free_port)
  cat >"$work/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[upstream]
address = "127.0.0.1:$redis_port"
[encryption]
$2
[audit]
${3:-enabled = false}
[[users]]
name = "default"
password_hash = "$hash"
project = "bench"
access = "readwrite"
TOML
  RUST_LOG=warn target/release/redcloak serve --config "$work/$1.toml" >/dev/null 2>"$work/$1.log" &
  proxy_pid=$!
  pids+=("$proxy_pid")
  until redis-cli -p "$port" ping 2>/dev/null | grep -q NOAUTH; do sleep 0.1; done
  proxy_port=$port
}

start_proxy plain "enabled = false"
plain_port=$proxy_port plain_pid=$proxy_pid
start_proxy sealed "enabled = true
key = \"$key\""
sealed_port=$proxy_port sealed_pid=$proxy_pid
start_proxy audited "enabled = true
key = \"$key\"" "enabled = true
path = \"$work/audit.log\"
access_logging = true"
audited_port=$proxy_port audited_pid=$proxy_pid

# Prints "rps p50 p99" for one run.
run_one() { # port, test, clients, pipeline, size, [password]
  local auth=()
  [ -n "${6:-}" ] && auth=(-a "$6")
  redis-benchmark -p "$1" "${auth[@]}" -t "$2" -c "$3" -P "$4" -d "$5" -n "$requests" \
    -r 100000 --csv 2>/dev/null | tail -n 1 | tr -d '"' |
    awk -F, '{ printf "%s %s %s\n", $2, $5, $7 }'
}

# Median over the repeats, by requests per second.
run() {
  for _ in $(seq "$repeats"); do run_one "$@"; done | sort -n -k1 | awk -v n="$repeats" 'NR == int((n + 1) / 2)'
}

printf '%-28s %-10s %12s %8s %8s %7s\n' scenario target 'req/s' p50_ms p99_ms ratio
for scenario in "50 1 100" "50 16 100" "50 1 4096"; do
  read -r clients pipeline size <<<"$scenario"
  for test in set get; do
    name="$test c=$clients P=$pipeline d=$size"
    read -r base_rps base_p50 base_p99 <<<"$(run "$redis_port" "$test" "$clients" "$pipeline" "$size")"
    printf '%-28s %-10s %12.0f %8s %8s %7s\n' "$name" redis "$base_rps" "$base_p50" "$base_p99" 1.00
    for target in plain sealed audited; do
      port_var="${target}_port"
      read -r rps p50 p99 <<<"$(run "${!port_var}" "$test" "$clients" "$pipeline" "$size" bench-pw)"
      ratio=$(awk -v a="$rps" -v b="$base_rps" 'BEGIN { printf "%.2f", a / b }')
      printf '%-28s %-10s %12.0f %8s %8s %7s\n' "" "$target" "$rps" "$p50" "$p99" "$ratio"
    done
  done
done

for target in plain sealed audited; do
  pid_var="${target}_pid"
  pid=${!pid_var}
  rss=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
  cpu=$(awk '{ printf "%.1f", ($14 + $15) / 100 }' "/proc/$pid/stat")
  echo "proxy ($target): peak RSS ${rss} KiB, CPU ${cpu} s"
done
