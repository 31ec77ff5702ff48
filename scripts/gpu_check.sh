#!/usr/bin/env bash
# The one GPU script: install the project, run the GPU tests and the benchmarks, print a short table
# last. Full logs and JSON go to $OUT (the device tool brings them back).
#   bash scripts/gpu_check.sh [STAGE ...]
#   STAGE: tests | tests:NAME (tests/test_NAME.py, or the folder tests/NAME) | bench:NAME
#          (benchmarks/bench_NAME.py) | study:PRESET (examples/study.py, both tasks, 4 runs at a time,
#          after a CUDA smoke run of both scripts) | all
# $OUT gets logs.tgz (every log and JSON) and one markdown table per benchmark.
# STAGE_TIMEOUT (seconds, default 1800) bounds each stage; TEST_WORKERS (default 8) sets pytest's -n;
# benchmarks marked `slow` run only with SLOW=1;
# BENCH_K=EXPR runs only the benchmarks pytest's -k EXPR selects;
# STUDY_BUDGET_S overrides the study preset's total training seconds.
set -uo pipefail
OUT=${OUT:-/tmp/entropy_attn_out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(all)
[ "${STAGES[*]}" = all ] && STAGES=(tests bench:attention bench:launch bench:pruned bench:pruned_trained bench:range bench:layers)

python3 -m pip install --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1 || { tail -20 "$LOGS/install.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.version.cuda)"
  echo "commit ${COMMIT:-unknown}"
} | tee "$LOGS/env.txt"

status=0
summary=()
for stage in "${STAGES[@]}"; do
  case "$stage" in
    tests|tests:*)
      name=${stage#tests}; name=${name#:}
      target=tests; [ -n "$name" ] && { target=tests/test_${name}.py; [ -d "tests/$name" ] && target=tests/$name; }
      log="$LOGS/tests${name:+_$name}.log"
      timeout "${STAGE_TIMEOUT:-1800}" python3 -m pytest "$target" -n "${TEST_WORKERS:-8}" -v --tb=short -p no:cacheprovider --durations=15 >"$log" 2>&1
      rc=$?; status=$((status | rc))
      summary+=("$stage: $(tail -1 "$log")")
      grep -E "(FAILED|ERROR) tests/" "$log" | sed "s/^.*\(FAILED\|ERROR\) /\1 /" | sort -u | head -40
      ;;
    bench:*)
      name=${stage#bench:}
      file=benchmarks/bench_${name}.py
      [ -f "$file" ] || { summary+=("$stage: no $file"); continue; }
      timeout "${STAGE_TIMEOUT:-1800}" python3 -m pytest "$file" -q -p no:cacheprovider -m "${SLOW:+slow or }not slow" ${BENCH_K:+-k "$BENCH_K"} --benchmark-enable --benchmark-json="$LOGS/bench_${name}.json" \
        >"$LOGS/bench_${name}.log" 2>&1
      rc=$?; status=$((status | rc))
      python3 benchmarks/report.py "$LOGS/bench_${name}.json" --markdown >"$OUT/bench_${name}.md" 2>>"$LOGS/bench_${name}.log"
      summary+=("$stage: $(tail -1 "$LOGS/bench_${name}.log")")
      ;;
    study:*)
      preset=${stage#study:}
      log="$LOGS/study_${preset}.log"
      { timeout 300 python3 -m examples.study --task both --preset smoke --regs shannon --seeds 0 --out "$LOGS/smoke_cuda" \
          --extra --device cuda --amp &&
        timeout "${STAGE_TIMEOUT:-1800}" python3 -m examples.study --task both --preset "$preset" --jobs 4 \
          ${STUDY_BUDGET_S:+--budget-s "$STUDY_BUDGET_S"} --out "$LOGS/study_$preset"; } >"$log" 2>&1
      rc=$?; status=$((status | rc))
      for f in "$LOGS/study_$preset"/study*.{md,png}; do [ -f "$f" ] && cp "$f" "$OUT/${preset}_$(basename "$f")"; done
      summary+=("$stage: $(grep -E 'runs succeeded' "$log" | tail -1) (exit $rc)")
      ;;
  esac
done
tar czf "$OUT/logs.tgz" --exclude='*.pt' -C "$LOGS" .
for f in "$OUT"/bench_*.md "$OUT"/*_study.md; do [ -f "$f" ] && cat "$f"; done
printf '%s\n' "${summary[@]}"
exit $status
