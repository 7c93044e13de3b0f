#!/usr/bin/env bash
# Runs every fuzz target for a bounded time, from the seeds committed in
# fuzz/corpus/<target>, and prints how many inputs each one tried.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# The default, 50 seconds for each of the three targets, keeps a run under
# three minutes after the build. Inputs the fuzzer finds go to a scratch
# directory, so the committed corpus stays small; to keep good new ones, run
# `cargo fuzz cmin <target>` in fuzz/ and commit what it leaves. A crash
# stops the run with a non-zero exit; its input is saved under
# fuzz/artifacts/<target>/, and reproduces with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>` in fuzz/.
#
# cargo-fuzz is installed when missing. libFuzzer needs compiler flags that
# stable Rust accepts only with RUSTC_BOOTSTRAP=1, which this script sets.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-50}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request_path reply_path open_sealed)

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Safe Rust needs no address sanitizer to catch what matters here (panics,
# overflows, unbounded allocation); without it each target runs about twice
# as many inputs in the same time. Debug assertions stay on.
fuzz_flags=(--sanitizer none --debug-assertions)
cargo fuzz build "${fuzz_flags[@]}"

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
summary=()
for target in "${targets[@]}"; do
  mkdir -p "$logs/$target"
  echo "fuzzing $target for ${seconds}s"
  if ! cargo fuzz run "${fuzz_flags[@]}" "$target" "$logs/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 >"$logs/$target.log" 2>&1; then
    tail -n 60 "$logs/$target.log"
    echo "fuzz target $target failed; its input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  execs="$(grep -m1 'stat::number_of_executed_units' "$logs/$target.log" | awk '{print $2}')"
  summary+=("$target: ${execs:-?} inputs in ${seconds}s")
done
printf 'fuzzing done, no crash\n'
printf '  %s\n' "${summary[@]}"
