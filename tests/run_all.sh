#!/usr/bin/env bash
# Every check CI runs (the README's test command, after third_party/install-deps.sh):
#   0. the machine: CPU model, oneDNN version and the ISA oneDNN dispatches (tests/cpu_isa.cpp);
#   1. the Release build in build/ (target resunet_tests: the tests and the programs they run) and its ctest suite; then the same suite again under each
#      ONEDNN_MAX_CPU_ISA cap of RESUNET_ISA_CAPS (default "AVX2 AVX512_CORE AVX512_CORE_BF16") that
#      changes what oneDNN dispatches here: an AVX-512 machine also checks the AVX2 and the
#      AVX-512-without-VNNI kernels (with the int8 weights of +-63 they need), an AMX one also the
#      AVX-512 bf16/VNNI kernels of machines without AMX (the capped runs leave out the suites no ISA
#      reaches: $isa_insensitive below);
#   1b. the same Release suite built against oneDNN 3.x in build-onednn3/ (RESUNET_ONEDNN3_PREFIX, default
#      third_party/onednn3/, which third_party/install-deps.sh fills from PyPI; docs/onednn3.md), uncapped;
#   2. the AddressSanitizer + UndefinedBehaviorSanitizer build in build-asan/ (libraries and tests,
#      no bench/) and its ctest suite, with the sanitizer options below;
#   3. the libFuzzer targets, built with clang in build-fuzz/, each run for RESUNET_FUZZ_SECONDS
#      (default 20) on its committed seed corpus fuzz/corpus/<target>/.
# The test and apps/ sources build at -O1 (Release) and -O0 (sanitizers): RESUNET_DRIVER_OPT in CMakeLists.txt.
# Each stage runs even when an earlier one failed. The last line is "N passed, M failed", counting
# the ctest tests of every suite plus the fuzz targets (a stage that does not build counts as one
# failure); the exit status is non-zero when M > 0.
#
# Environment: JOBS (default 2), RESUNET_FUZZ_SECONDS (default 20), RESUNET_SKIP_STAGES (e.g. "asan fuzz";
# stages: release onednn3 asan fuzz), RESUNET_ISA_CAPS (default "AVX2 AVX512_CORE AVX512_CORE_BF16"; empty: no
# capped runs), RESUNET_ONEDNN3_PREFIX (default third_party/onednn3; a missing one fails the stage).
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
isa_caps="${RESUNET_ISA_CAPS-AVX2 AVX512_CORE AVX512_CORE_BF16}"
# Under an ISA cap, the suites whose code never reaches a oneDNN primitive or one of our ISA-dispatched
# kernels are left out (they ran once, uncapped): files, data, parsing, signals and disks, usage errors, the
# installed package that examples/ is built against, and the MPI jobs (label mpi; the data-parallel
# trainer's kernels are the Trainer suites').
isa_insensitive='^(Adam|Augment|CheckTensors|CliVocabulary|Comm|ConvertCli|Crc32|CtrlC|FullDisk|Graph|HalfFloat|Hostile[A-Za-z]*|InstallPackage|InterruptedWrite|KillNine|Loader|Metrics|MpiJob|HelpFormat|ProgramUsage|ProgramVersion|DataParallelMpi[A-Za-z]*|RealData|Safetensors[A-Za-z]*|Sha256|Shard|Split|StaleTempFiles|StepLR|Synthetic|TrainCliConfig|UnwritableFolder)\.|\.(HelpUsageErrorsAndExitCodes|FlagRangesOnePrefixAndTruthfulHelp|BadInputIsOneLine[A-Za-z]*|RefusesBadInputBeforeAnyWork)$'

# ---------------------------------------------------------------------------------------------- machine
echo "==== run_all: machine"
isa_tool="$logs/cpu_isa"
native_isa=""
if g++ -O1 tests/cpu_isa.cpp -ldnnl -o "$isa_tool" > "$logs/cpu_isa.log" 2>&1; then
  "$isa_tool" | sed 's/^/  /'
  native_isa=$("$isa_tool" | awk -F': ' '/^isa:/ {print $2}')
else
  echo "  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "  isa: unknown (tests/cpu_isa.cpp did not build; see build-logs/cpu_isa.log)"
fi
echo "  cores: $(nproc)"
onednn3_prefix="${RESUNET_ONEDNN3_PREFIX:-$root/third_party/onednn3}"
if [[ " $skip " != *" onednn3 "* ]]; then
  if g++ -O1 tests/cpu_isa.cpp -I"$onednn3_prefix/include" -L"$onednn3_prefix/lib" -Wl,-rpath,"$onednn3_prefix/lib" -ldnnl \
       -o "$isa_tool-onednn3" > "$logs/cpu_isa-onednn3.log" 2>&1; then
    echo "  second build: oneDNN $("$isa_tool-onednn3" | awk -F': ' '/^onednn:/ {print $2}') in $onednn3_prefix"
  else
    echo "  second build: no oneDNN in $onednn3_prefix (see build-logs/cpu_isa-onednn3.log; bash third_party/install-deps.sh)"
  fi
fi

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
  if run_logged "$logs/release-configure.log" cmake -S . -B build -G Ninja -DRESUNET_DRIVER_OPT=-O1 &&
     run_logged "$logs/release-build.log" cmake --build build -j"$jobs" --target resunet_tests; then
    ctest --test-dir build --output-on-failure -j"$jobs" 2>&1 | tee "$logs/release-ctest.log"
    count_ctest "$logs/release-ctest.log"
    end_stage "release" "$result"
    # The same suite with oneDNN capped to a lower ISA, where that changes what it dispatches here.
    for cap in $isa_caps; do
      capped_isa=""
      [ -n "$native_isa" ] && capped_isa=$(ONEDNN_MAX_CPU_ISA="$cap" "$isa_tool" | awk -F': ' '/^isa:/ {print $2}')
      if [ -z "$capped_isa" ] || [ "$capped_isa" = "$native_isa" ]; then
        echo "==== run_all: release with ONEDNN_MAX_CPU_ISA=$cap: skipped (oneDNN dispatches ${native_isa:-an unknown ISA} here, the cap changes nothing)"
        continue
      fi
      begin_stage "Release tests with ONEDNN_MAX_CPU_ISA=$cap (oneDNN dispatches $capped_isa instead of $native_isa)"
      ONEDNN_MAX_CPU_ISA="$cap" ctest --test-dir build --output-on-failure -j"$jobs" -LE mpi -E "$isa_insensitive" 2>&1 |
        tee "$logs/release-$cap-ctest.log"
      count_ctest "$logs/release-$cap-ctest.log"
      end_stage "release, ISA capped at $cap ($capped_isa)" "$result"
    done
  else
    failed=$((failed + 1))
    end_stage "release" "build FAILED: 1 failed (logs in build-logs/)"
  fi
fi

# ---------------------------------------------------------------------------------------------- oneDNN 3.x
# The same code and suite against the other major version (engine/onednn_compat.*). Uncapped, to keep CI
# near its half hour: the capped reruns above cover our own ISA-dependent kernels, and 3.x's own kernels
# under a cap were checked once by hand (docs/onednn3.md).
if [[ " $skip " != *" onednn3 "* ]]; then
  begin_stage "Release build and tests against oneDNN 3.x in $onednn3_prefix (build-onednn3/)"
  if [ ! -f "$onednn3_prefix/include/oneapi/dnnl/dnnl_version.h" ]; then
    failed=$((failed + 1))
    end_stage "onednn3" "no oneDNN 3.x in $onednn3_prefix (run third_party/install-deps.sh): 1 failed"
  elif run_logged "$logs/onednn3-configure.log" cmake -S . -B build-onednn3 -G Ninja -DRESUNET_DRIVER_OPT=-O1 \
         -DCMAKE_PREFIX_PATH="$onednn3_prefix" &&
       run_logged "$logs/onednn3-build.log" cmake --build build-onednn3 -j"$jobs" --target resunet_tests; then
    ctest --test-dir build-onednn3 --output-on-failure -j"$jobs" 2>&1 | tee "$logs/onednn3-ctest.log"
    count_ctest "$logs/onednn3-ctest.log"
    end_stage "onednn3" "$result"
  else
    failed=$((failed + 1))
    end_stage "onednn3" "build FAILED: 1 failed (logs in build-logs/)"
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
       -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" -DRESUNET_SANITIZE=ON -DRESUNET_BENCH=OFF -DRESUNET_DRIVER_OPT=-O0 &&
     run_logged "$logs/asan-build.log" cmake --build build-asan -j"$jobs"; then
    # -LE mpi: Open MPI's own MPI_Init allocations are reported by LeakSanitizer (121 kB in 3347
    # allocations for a bare MPI_Init/MPI_Finalize under mpirun), so the tests that run under mpirun
    # (label mpi) run in the Release stage only. The plain tests never initialise MPI and stay here.
    ctest --test-dir build-asan --output-on-failure -j"$jobs" -LE mpi 2>&1 | tee "$logs/asan-ctest.log"
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
  targets=(fuzz_safetensors fuzz_model fuzz_image fuzz_split fuzz_config fuzz_plan)
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
