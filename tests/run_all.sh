#!/usr/bin/env bash
# Every check CI runs (the README's test command, after third_party/install-deps.sh):
#   1. the Release build in build/ and its ctest suite;
#   2. the AddressSanitizer + UndefinedBehaviorSanitizer build in build-asan/ (libraries and tests,
#      no bench/) and its ctest suite, with the sanitizer options below;
#   3. the libFuzzer targets, built with clang in build-fuzz/, each run for RESUNET_FUZZ_SECONDS
#      (default 20) on its committed seed corpus fuzz/corpus/<target>/.
# Each stage runs even when an earlier one failed. The last line is "N passed, M failed", counting
# the ctest tests of both suites plus the fuzz targets (a stage that does not build counts as one
# failure); the exit status is non-zero when M > 0.
#
# Environment: JOBS (default 2), RESUNET_FUZZ_SECONDS (default 20), RESUNET_SKIP_STAGES (e.g. "asan fuzz").
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

jobs="${JOBS:-2}"
fuzz_seconds="${RESUNET_FUZZ_SECONDS:-20}"
skip="${RESUNET_SKIP_STAGES:-}"
logs="$root/build-logs"
mkdir -p "$logs"

passed=0
failed=0
summary=()

stage_start=0
begin_stage() {
  stage_start=$(date +%s)
  echo "==== run_all: $1"
}
end_stage() {
  local seconds=$(($(date +%s) - stage_start))
  summary+=("$1: $2 (${seconds} s)")
  echo "==== run_all: $1: $2 (${seconds} s)"
}

# Runs a configure or build command into a log; prints its warnings and errors; returns its status.
run_logged() {
  local log="$1"
  shift
  "$@" > "$log" 2>&1
  local status=$?
  grep -E 'warning:|error:|FAILED:|CMake Error' "$log" | head -60
  [ "$status" -eq 0 ] || tail -30 "$log"
  return "$status"
}

# Adds the counts of ctest's "NN% tests passed, F tests failed out of T" line to the totals and sets
# `result`; a missing line (ctest did not get that far) is one failure.
result=""
count_ctest() {
  local log="$1" line total bad
  line=$(grep -E '[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -1)
  if [ -z "$line" ]; then
    failed=$((failed + 1))
    result="no ctest summary: 1 failed"
    return
  fi
  total=$(sed -E 's/.* out of ([0-9]+).*/\1/' <<<"$line")
  bad=$(sed -E 's/.* ([0-9]+) tests? failed.*/\1/' <<<"$line")
  passed=$((passed + total - bad))
  failed=$((failed + bad))
  result="$((total - bad)) passed, $bad failed"
}

# ---------------------------------------------------------------------------------------------- Release
if [[ " $skip " != *" release "* ]]; then
  begin_stage "Release build and tests (build/)"
  if run_logged "$logs/release-configure.log" cmake -S . -B build -G Ninja &&
     run_logged "$logs/release-build.log" cmake --build build -j"$jobs"; then
    ctest --test-dir build --output-on-failure -j"$jobs" 2>&1 | tee "$logs/release-ctest.log"
    count_ctest "$logs/release-ctest.log"
    end_stage "release" "$result"
  else
    failed=$((failed + 1))
    end_stage "release" "build FAILED: 1 failed (logs in build-logs/)"
  fi
fi

# ---------------------------------------------------------------------------------------------- ASan + UBSan
# No false positives and no leaks showed up (oneDNN's JIT kernels, OpenMP, TBB and OpenCV included), so
# nothing is suppressed: LeakSanitizer is on, and UBSan stops at the first report (-fno-sanitize-recover)
# with a stack. Exported before building: gtest_discover_tests runs each test binary at build time.
export ASAN_OPTIONS="detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
if [[ " $skip " != *" asan "* ]]; then
  begin_stage "AddressSanitizer + UndefinedBehaviorSanitizer build and tests (build-asan/)"
  if run_logged "$logs/asan-configure.log" cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug \
       -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" -DRESUNET_SANITIZE=ON -DRESUNET_BENCH=OFF &&
     run_logged "$logs/asan-build.log" cmake --build build-asan -j"$jobs"; then
    ctest --test-dir build-asan --output-on-failure -j"$jobs" 2>&1 | tee "$logs/asan-ctest.log"
    count_ctest "$logs/asan-ctest.log"
    end_stage "asan" "$result"
  else
    failed=$((failed + 1))
    end_stage "asan" "build FAILED: 1 failed (logs in build-logs/)"
  fi
fi

# ---------------------------------------------------------------------------------------------- fuzzing
if [[ " $skip " != *" fuzz "* ]]; then
  begin_stage "libFuzzer targets, ${fuzz_seconds} s each (build-fuzz/)"
  targets=(fuzz_safetensors fuzz_image fuzz_split fuzz_config)
  # -O1 here: clang's -O0 runs the targets 3 to 5 times slower (fuzz_config most) for a small build saving.
  if CC=clang CXX=clang++ run_logged "$logs/fuzz-configure.log" cmake -S . -B build-fuzz -G Ninja \
       -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" -DRESUNET_FUZZ=ON -DRESUNET_SANITIZE=ON \
       -DRESUNET_BENCH=OFF &&
     run_logged "$logs/fuzz-build.log" cmake --build build-fuzz -j"$jobs" --target fuzz_all; then
    fuzz_passed=0
    fuzz_failed=0
    for target in "${targets[@]}"; do
      # New inputs go to a scratch corpus; the committed seeds are only read.
      work="build-fuzz/corpus/$target"
      mkdir -p "$work" build-fuzz/artifacts
      dict=()
      [ -f "fuzz/${target#fuzz_}.dict" ] && dict=(-dict="fuzz/${target#fuzz_}.dict")
      if "build-fuzz/fuzz/$target" -max_total_time="$fuzz_seconds" -timeout=10 -rss_limit_mb=2048 \
           -print_final_stats=1 "${dict[@]}" -artifact_prefix="build-fuzz/artifacts/$target-" \
           "$work" "fuzz/corpus/$target" > "$logs/$target.log" 2>&1; then
        fuzz_passed=$((fuzz_passed + 1))
        echo "$target: ok, $(awk '/^stat::number_of_executed_units/ {print $2}' "$logs/$target.log") runs"
      else
        fuzz_failed=$((fuzz_failed + 1))
        echo "$target: FAILED (input saved under build-fuzz/artifacts/; log build-logs/$target.log)"
        grep -E -A40 '==ERROR|runtime error|fuzz invariant|deadly signal|uncaught exception|terminate called' \
          "$logs/$target.log" | head -60
      fi
    done
    passed=$((passed + fuzz_passed))
    failed=$((failed + fuzz_failed))
    end_stage "fuzz" "$fuzz_passed passed, $fuzz_failed failed"
  else
    failed=$((failed + 1))
    end_stage "fuzz" "build FAILED: 1 failed (logs in build-logs/)"
  fi
fi

echo "==== run_all: summary"
for line in "${summary[@]}"; do echo "  $line"; done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
