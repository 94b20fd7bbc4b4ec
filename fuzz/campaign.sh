#!/usr/bin/env bash
# A fuzzing campaign: every target (or those named) in turn, one fuzz process at a
# time, niced, for SECONDS of fuzzing each. A run that finds a crash saves it under
# artifacts/<target>/ and the target is restarted for the time left, so each target
# gets its full time. New corpus entries go to work/<target>/ (not committed); the
# seeds in corpus/<target>/ are read, never written.
#
#   fuzz/campaign.sh [SECONDS] [TARGET...]       (default: 600 s, every target)
#
# Prints and appends to logs/summary.tsv one line per target: seconds fuzzed,
# executions (libFuzzer's stat::number_of_executed_units, summed over restarts),
# corpus entries and bytes at the end, runs that ended in a crash, and the result.
# Exits 1 if a target failed to build or crashed.
set -uo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
secs=${1:-600}
shift || true
if (($#)); then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
mkdir -p work logs
status=0
for t in "${targets[@]}"; do
  if ! nice -n 15 cargo fuzz build "$t" >"logs/$t.build.log" 2>&1; then
    printf '%s\tbuild failed (logs/%s.build.log)\n' "$t" "$t" | tee -a logs/summary.tsv
    tail -20 "logs/$t.build.log" >&2
    status=1
    continue
  fi
  mkdir -p "work/$t"
  start=$(date +%s)
  execs=0 crashes=0 run=0 corpus="?"
  while :; do
    left=$((secs - ($(date +%s) - start)))
    ((left >= 5)) || break
    log="logs/$t.run$run.log"
    nice -n 15 cargo fuzz run "$t" "work/$t" "corpus/$t" -- \
      -max_total_time="$left" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 \
      >"$log" 2>&1
    rc=$?
    n=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
    # A run stopped by a crash may not print final stats: its last status line counts.
    [ -n "$n" ] || n=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')
    execs=$((execs + ${n:-0}))
    c=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$log" | tail -1 | cut -d' ' -f2)
    [ -n "$c" ] && corpus=$c
    run=$((run + 1))
    if ((rc != 0)); then
      crashes=$((crashes + 1))
      grep -m1 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | sed "s/^/$t run $run: /"
      ((run < 50)) || break
    else
      break
    fi
  done
  elapsed=$(($(date +%s) - start))
  result="no crash"
  if ((crashes)); then
    result="$crashes run(s) crashed: see artifacts/$t/"
    status=1
  fi
  printf '%s\t%ss\t%s execs\tcorpus %s\t%s\n' "$t" "$elapsed" "$execs" "$corpus" "$result" |
    tee -a logs/summary.tsv
done
exit $status
