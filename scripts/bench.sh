#!/usr/bin/env bash
# Benchmarks redcloak against Redis directly, in one run. It starts a
# redis-server and the proxy in three setups:
#
#   plain    plaintext listener, keys namespaced, values as they are
#   sealed   plaintext listener, keys namespaced, values sealed
#   tls      TLS listener, keys namespaced, values sealed
#   audited  as sealed, plus an access event per command in the audit log
#            (only with BENCH_AUDITED=1)
#   twemproxy  twemproxy (Debian's nutcracker) in front of the same Redis, a
#            plain L4-style Redis proxy for reference (only with
#            BENCH_TWEMPROXY=1; it is installed when missing)
#
# and runs redis-benchmark for SET and GET at 50 clients with pipeline 1 and
# 100-byte values, pipeline 16 and 100-byte values, and pipeline 1 and
# 4096-byte values. Each repeat runs Redis directly and then every setup in
# turn, so that noise on the machine hits all of them alike; the table shows
# the median of the repeats, the ratio median(setup) / median(redis), and
# whether the ratio meets its goal (see goal() below) where it has one, and
# the CPU time per request of the proxy, redis-server and redis-benchmark.
# Speed is measured here, never asserted in tests.
#
#   scripts/bench.sh [REQUESTS] [REPEATS]     (defaults: 100000, 3)
#
# BENCH_SCENARIOS="50 1 4096,50 16 100" runs only the scenarios listed, each
# as "clients pipeline size"; BENCH_TESTS="set" runs only SET;
# BENCH_WORKERS=2 sets the proxies' server.workers (default: theirs).
#
# Then, unless BENCH_CLUSTER=0, a cluster scenario: a three-master Redis
# Cluster, driven directly by `redis-benchmark --cluster` (a client that
# knows the slots) and through the sealed proxy in cluster mode (a client
# that does not), for SET and GET at 50 clients with pipeline 1 and 16.
# It is reported, without a target.
set -euo pipefail
cd "$(dirname "$0")/.."

requests=${1:-100000}
repeats=${2:-3}
audited=${BENCH_AUDITED:-0}
twemproxy=${BENCH_TWEMPROXY:-0}
if ! [[ "$requests" =~ ^[1-9][0-9]*$ && "$repeats" =~ ^[1-9][0-9]*$ && "${BENCH_WORKERS:-0}" =~ ^[0-9]+$ ]]; then
  echo "usage: [BENCH_AUDITED=1] scripts/bench.sh [REQUESTS] [REPEATS]" >&2
  exit 2
fi

scripts/install-deps.sh
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/redcloak"

setups=(plain sealed tls)
[ "$audited" = 1 ] && setups+=(audited)
if [ "$twemproxy" = 1 ]; then
  setups+=(twemproxy)
  command -v nutcracker >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nutcracker >/dev/null
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
# So that Ctrl-C and kill still run the cleanup above.
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
  echo "bench.sh: process $pid did not come up; its log:" >&2
  cat "$log" >&2
  exit 1
}

# Whether Redis, or a proxy asking for AUTH, answers on port $1 (extra
# redis-cli arguments follow).
redis_answers() { [[ "$(redis-cli -p "$@" ping 2>&1)" == PONG ]]; }
proxy_answers() { [[ "$(redis-cli -p "$@" ping 2>&1)" == *NOAUTH* ]]; }

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- 2>/dev/null || commit+=" (with uncommitted changes)"
cmdline="scripts/bench.sh $requests $repeats"
[ "$audited" = 1 ] && cmdline="BENCH_AUDITED=1 $cmdline"
[ "$twemproxy" = 1 ] && cmdline="BENCH_TWEMPROXY=1 $cmdline"
[ -n "${BENCH_WORKERS:-}" ] && cmdline="BENCH_WORKERS=$BENCH_WORKERS $cmdline"
[ -n "${BENCH_TESTS:-}" ] && cmdline="BENCH_TESTS=\"$BENCH_TESTS\" $cmdline"
[ -n "${BENCH_SCENARIOS:-}" ] && cmdline="BENCH_SCENARIOS=\"$BENCH_SCENARIOS\" $cmdline"
echo "command:  $cmdline"
echo "machine:  $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
echo "versions: redcloak $commit, $(redis-server --version | awk '{ sub("v=", "", $3); print "redis-server", $3 }'), $(redis-benchmark --version)"
# GET reads random keys of the 100000 that the SET runs before it wrote at
# random, so part of its requests find no key.
echo "keys:     GET finds about $(awk -v n="$((requests * repeats))" 'BEGIN { printf "%.0f", 100 * (1 - exp(-n / 100000)) }')% of its keys"
echo

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
wait_until "$redis_pid" "$work/redis.log" redis_answers "$redis_port"

# One password for every setup; the hash uses few PBKDF2 iterations so that
# the 50 connections of each run don't measure AUTH.
hash=$(printf 'bench-pw\n' | "$bin" hash-password --iterations 1000)
key=$(head -c 32 /dev/urandom | base64)
certs/gen-certs.sh "$work/certs" >/dev/null
tls_args=(--tls --cacert "$work/certs/ca.crt")

declare -A port pid
port[redis]=$redis_port

# Starts the proxy for one setup. Each setup has its own project, so that
# one setup never reads values another one wrote (sealed or not). The
# cluster setup is sealed, in front of the cluster seeded by $cluster_seeds.
start_proxy() { # setup
  local p encryption="enabled = false" tls="" audit="enabled = false" check=()
  local upstream="address = \"127.0.0.1:$redis_port\""
  p=$(free_port)
  case "$1" in
    sealed | tls | audited | cluster) encryption="enabled = true
key = \"$key\"" ;;
  esac
  [ "$1" = cluster ] && upstream="mode = \"cluster\"
nodes = [$cluster_seeds]"
  if [ "$1" = tls ]; then
    tls="[server.tls]
cert = \"$work/certs/server.crt\"
key = \"$work/certs/server.key\""
    check=("${tls_args[@]}")
  fi
  [ "$1" = audited ] && audit="enabled = true
path = \"$work/audit.log\"
access_logging = true"
  cat >"$work/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$p"
workers = ${BENCH_WORKERS:-0}
$tls
[upstream]
$upstream
[encryption]
$encryption
[audit]
$audit
[[users]]
name = "default"
password_hash = "$hash"
project = "bench-$1"
access = "readwrite"
TOML
  RUST_LOG=warn "$bin" serve --config "$work/$1.toml" >/dev/null 2>"$work/$1.log" &
  pid[$1]=$!
  pids+=("${pid[$1]}")
  port[$1]=$p
  wait_until "${pid[$1]}" "$work/$1.log" proxy_answers "$p" "${check[@]}"
}
# twemproxy, with one pool of the one Redis; it has no AUTH of its own.
start_twemproxy() {
  local p
  p=$(free_port)
  cat >"$work/twemproxy.yml" <<YAML
bench:
  listen: 127.0.0.1:$p
  redis: true
  hash: fnv1a_64
  distribution: ketama
  servers:
    - 127.0.0.1:$redis_port:1
YAML
  nutcracker -c "$work/twemproxy.yml" -s "$(free_port)" -o "$work/twemproxy.log" &
  pid[twemproxy]=$!
  pids+=("${pid[twemproxy]}")
  port[twemproxy]=$p
  wait_until "${pid[twemproxy]}" "$work/twemproxy.log" redis_answers "$p"
}
for s in "${setups[@]}"; do
  if [ "$s" = twemproxy ]; then start_twemproxy; else start_proxy "$s"; fi
done

# CPU ticks (user + system) of a process so far.
cpu_ticks() {
  sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

# Prints "rps p50 p99" from the CSV of the last redis-benchmark run
# ($work/benchmark.out), or fails with its errors.
benchmark_figures() { # what it ran against
  local out
  # redis-benchmark's CSV: "test","rps","avg","min","p50","p95","p99","max".
  out=$(tail -n 1 "$work/benchmark.out" | tr -d '"' | awk -F, '$2 + 0 > 0 { print $2, $5, $7 }')
  if [ -z "$out" ]; then
    echo "bench.sh: redis-benchmark against $1 failed:" >&2
    cat "$work/benchmark.err" >&2
    return 1
  fi
  echo "$out"
}

# Prints "rps p50 p99 proxy redis client" of one redis-benchmark run: the
# last three are the CPU microseconds per request that the proxy (0 when
# the run is direct), redis-server and redis-benchmark spent. On a machine
# where the three share the cores, rps follows from their sum.
bench_once() { # setup, test, clients, pipeline, size
  local args=(-p "${port[$1]}") out proxy0=0 proxy1=0 redis0 redis1 TIMEFORMAT='%U %S'
  [ "$1" != redis ] && [ "$1" != twemproxy ] && args+=(-a bench-pw)
  [ "$1" = tls ] && args+=("${tls_args[@]}")
  [ "$1" != redis ] && proxy0=$(cpu_ticks "${pid[$1]}")
  redis0=$(cpu_ticks "$redis_pid")
  { time redis-benchmark "${args[@]}" -t "$2" -c "$3" -P "$4" -d "$5" -n "$requests" \
    -r 100000 --csv >"$work/benchmark.out" 2>"$work/benchmark.err"; } 2>"$work/benchmark.time" || true
  [ "$1" != redis ] && proxy1=$(cpu_ticks "${pid[$1]}")
  redis1=$(cpu_ticks "$redis_pid")
  out=$(benchmark_figures "$1") || exit 1
  awk -v out="$out" -v n="$requests" -v hz="$(getconf CLK_TCK)" \
    -v proxy=$((proxy1 - proxy0)) -v redis=$((redis1 - redis0)) -v client="$(cat "$work/benchmark.time")" \
    'BEGIN { split(client, c, " "); us = 1e6 / n
      printf "%s %.1f %.1f %.1f\n", out, proxy / hz * us, redis / hz * us, (c[1] + c[2]) * us }'
}

# Median of column N of a file of runs, one run per line.
median() { # file, column
  cut -d' ' -f"$2" "$1" | sort -g |
    awk '{ v[NR] = $1 } END { printf "%.3f\n", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# The goal for a setup's ratio in a scenario, if it has one.
goal() { # setup, pipeline, size
  case "$1 $2 $3" in
    "sealed 1 100") echo 0.90 ;;
    "sealed 16 100") echo 0.60 ;;
    "sealed 1 4096") echo 0.80 ;;
    "tls 1 100") echo 0.60 ;;
  esac
}

# The *_us columns are CPU microseconds per request (see bench_once).
row='%-22s %-8s %10s %8s %8s %6s  %-13s %8s %8s %9s\n'
# shellcheck disable=SC2059 # the format is the one above
printf "$row" scenario setup 'req/s' p50_ms p99_ms ratio target proxy_us redis_us client_us

met=0 goals=0
mkdir "$work/runs"
IFS=, read -r -a scenarios <<<"${BENCH_SCENARIOS:-50 1 100,50 16 100,50 1 4096}"
read -r -a tests <<<"${BENCH_TESTS:-set get}"
for scenario in "${scenarios[@]}"; do
  read -r clients pipeline size <<<"$scenario"
  for test in "${tests[@]}"; do
    for _ in $(seq "$repeats"); do
      for s in redis "${setups[@]}"; do
        bench_once "$s" "$test" "$clients" "$pipeline" "$size" >>"$work/runs/$s"
      done
    done
    name="$test c=$clients P=$pipeline d=$size"
    for s in redis "${setups[@]}"; do
      rps=$(median "$work/runs/$s" 1)
      p50=$(median "$work/runs/$s" 2)
      p99=$(median "$work/runs/$s" 3)
      cpu=()
      for field in 4 5 6; do
        cpu+=("$(median "$work/runs/$s" "$field" | xargs printf '%.1f')")
      done
      [ "$s" = redis ] && cpu[0]=-
      rm "$work/runs/$s"
      [ "$s" = redis ] && base=$rps
      ratio=$(awk -v a="$rps" -v b="$base" 'BEGIN { printf "%.2f", a / b }')
      verdict=""
      g=$(goal "$s" "$pipeline" "$size")
      if [ -n "$g" ]; then
        goals=$((goals + 1))
        if awk -v a="$rps" -v b="$base" -v g="$g" 'BEGIN { exit !(a / b >= g) }'; then
          verdict=">=$g met" met=$((met + 1))
        else
          verdict=">=$g MISSED"
        fi
      fi
      # shellcheck disable=SC2059
      printf "$row" "$name" "$s" "$(printf '%.0f' "$rps")" "$p50" "$p99" "$ratio" "$verdict" "${cpu[@]}" |
        sed 's/ *$//'
      name=""
    done
  done
  # Each scenario starts from an empty Redis, and memory stays bounded.
  redis-cli -p "$redis_port" flushall >/dev/null
done
echo
echo "targets met: $met of $goals (median of $repeats)"
echo

# CPU seconds (user + system) of a process so far.
cpu_secs() {
  sed 's/.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($12 + $13) / hz }'
}
for s in "${setups[@]}"; do
  hwm=$(awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/${pid[$s]}/status")
  printf 'proxy %-8s peak RSS %7s MiB, CPU %7s s\n' "$s" "$hwm" "$(cpu_secs "${pid[$s]}")"
done
printf 'redis-server   CPU %s s (all setups and direct runs together)\n' "$(cpu_secs "$redis_pid")"

[ "${BENCH_CLUSTER:-1}" = 1 ] || exit 0

# A port whose cluster bus port (port + 10000) is free too.
free_cluster_port() {
  python3 -c '
import socket
while True:
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    if p + 10000 > 65535: a.close(); continue
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 10000)); print(p); break
    except OSError:
        pass
    finally:
        a.close(); b.close()'
}

echo
echo "cluster: 3 masters, no replicas; direct = redis-benchmark --cluster, proxy = sealed setup in cluster mode"
nodes=()
for n in 1 2 3; do
  p=$(free_cluster_port)
  mkdir -p "$work/node$n"
  redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no \
    --cluster-enabled yes --cluster-config-file "$work/node$n/nodes.conf" \
    --dir "$work/node$n" --daemonize no >"$work/node$n.log" 2>&1 &
  pids+=($!)
  wait_until "$!" "$work/node$n.log" redis_answers "$p"
  nodes+=("127.0.0.1:$p")
done
redis-cli --cluster create "${nodes[@]}" --cluster-yes >"$work/cluster-create.log" 2>&1
cluster_ok() { [[ "$(redis-cli -p "${nodes[0]#*:}" cluster info 2>/dev/null)" == *cluster_state:ok* ]]; }
wait_until "${pids[-1]}" "$work/cluster-create.log" cluster_ok

cluster_seeds=$(printf '"%s",' "${nodes[@]}")
cluster_seeds=${cluster_seeds%,}
start_proxy cluster

# Prints "rps p50 p99" of one run: direct with --cluster, or through the proxy.
cluster_once() { # direct|proxy, test, pipeline
  local args out
  if [ "$1" = direct ]; then
    args=(--cluster -p "${nodes[0]#*:}")
  else
    args=(-p "${port[cluster]}" -a bench-pw)
  fi
  redis-benchmark "${args[@]}" -t "$2" -c 50 -P "$3" -d 100 -n "$requests" \
    -r 100000 --csv >"$work/benchmark.out" 2>"$work/benchmark.err" || true
  benchmark_figures "cluster ($1)" || exit 1
}

# shellcheck disable=SC2059
printf "$row" scenario setup 'req/s' p50_ms p99_ms ratio ''
for pipeline in 1 16; do
  for test in "${tests[@]}"; do
    for _ in $(seq "$repeats"); do
      for s in direct proxy; do
        cluster_once "$s" "$test" "$pipeline" >>"$work/runs/cluster-$s"
      done
    done
    name="$test c=50 P=$pipeline d=100"
    for s in direct proxy; do
      rps=$(median "$work/runs/cluster-$s" 1)
      p50=$(median "$work/runs/cluster-$s" 2)
      p99=$(median "$work/runs/cluster-$s" 3)
      rm "$work/runs/cluster-$s"
      [ "$s" = direct ] && base=$rps
      ratio=$(awk -v a="$rps" -v b="$base" 'BEGIN { printf "%.2f", a / b }')
      # shellcheck disable=SC2059
      printf "$row" "$name" "$s" "$(printf '%.0f' "$rps")" "$p50" "$p99" "$ratio" "" |
        sed 's/ *$//'
      name=""
    done
  done
done
hwm=$(awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/${pid[cluster]}/status")
printf 'proxy %-8s peak RSS %7s MiB, CPU %7s s\n' cluster "$hwm" "$(cpu_secs "${pid[cluster]}")"
