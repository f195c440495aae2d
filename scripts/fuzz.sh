#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets, libFuzzer through cargo-fuzz) for a bounded time,
# starting from its committed seed corpus (fuzz/corpus/<target>). Needs the nightly toolchain
# (`rustup toolchain install nightly`); installs cargo-fuzz if it is missing. Not part of the
# README's test command. A crash leaves its input in fuzz/artifacts/<target>/: make it a
# regression test, fix it, and commit both.
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   scripts/fuzz.sh 300 jwt_verify  # one target, 5 minutes
#   FUZZ_SANITIZER=address scripts/fuzz.sh   # with AddressSanitizer (slower; default: none,
#                                            # as Causeway's own code is safe Rust)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(dns_message http_front_guard jwt_verify config_yaml broker_decode)
fi
sanitizer=${FUZZ_SANITIZER:-none}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cargo +nightly fuzz build --sanitizer "$sanitizer" -O

failed=()
for target in "${targets[@]}"; do
  echo "== $target: ${seconds}s"
  # New inputs that widen coverage go to a scratch corpus; the committed seeds stay as they are.
  scratch="target/corpus/$target"
  mkdir -p "$scratch"
  if ! cargo +nightly fuzz run --sanitizer "$sanitizer" -O "$target" "$scratch" "corpus/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
    failed+=("$target")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "no crashes in ${targets[*]}"
