#!/usr/bin/env bash
# A fuzzing campaign: every target (or those named) in turn, one fuzz process at a
# time, niced, until each target has used SECONDS of *CPU time* (user + system, read
# from /proc, so a campaign on a busy machine fuzzes as much as one on an idle machine,
# only slower). A run that finds a crash saves it under artifacts/<target>/ and the
# target is restarted for the CPU time left. New corpus entries go to work/<target>/
# (not committed); the seeds in corpus/<target>/ are read, never written.
#
#   fuzz/campaign.sh [SECONDS] [TARGET...]       (default: 600 CPU-seconds, every target)
#
# Prints and appends to logs/summary.tsv one line per target: CPU seconds fuzzed and
# wall seconds taken (build time excluded), executions (libFuzzer's
# stat::number_of_executed_units, summed over restarts), corpus entries and bytes at the
# end, runs that ended in a crash, and the result. Logs are named after this campaign's
# process id, so two campaigns on different targets can run at once.
# Exits 1 if a target failed to build or crashed.
set -uo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
secs=${1:-600}
shift || true
if (($#)); then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
mkdir -p work logs
tick=$(getconf CLK_TCK)
triple=$(rustc -vV | sed -n 's/^host: //p')
id=$$
status=0

# CPU time (user + system) of process $1 in clock ticks, or empty once it is gone.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null; }

for t in "${targets[@]}"; do
  blog="logs/$t.build.$id.log"
  if ! nice -n 15 cargo fuzz build "$t" >"$blog" 2>&1; then
    printf '%s\tbuild failed (%s)\n' "$t" "$blog" | tee -a logs/summary.tsv
    tail -20 "$blog" >&2
    status=1
    continue
  fi
  bin="target/$triple/release/$t"
  mkdir -p "work/$t"
  used=0 wall=0 execs=0 crashes=0 run=0 corpus="?"
  while :; do
    left=$((secs * tick - used))
    ((left >= 5 * tick)) || break
    # Rebuilt before each restart (untimed), so a fix made meanwhile is fuzzed.
    nice -n 15 cargo fuzz build "$t" >>"$blog" 2>&1 || break
    log="logs/$t.run$run.$id.log"
    start=$(date +%s)
    nice -n 15 "$bin" "work/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
      -max_total_time=86400 -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 \
      >"$log" 2>&1 &
    pid=$!
    mkdir -p "artifacts/$t"
    last=0
    while now=$(cpu_ticks "$pid") && [ -n "$now" ]; do
      last=$now
      if ((now >= left)); then
        kill -INT "$pid" 2>/dev/null
        break
      fi
      sleep 1
    done
    wait "$pid"
    rc=$?
    used=$((used + last))
    wall=$((wall + $(date +%s) - start))
    n=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
    # A run stopped by a crash may not print final stats: its last status line counts.
    [ -n "$n" ] || n=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')
    execs=$((execs + ${n:-0}))
    c=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$log" | tail -1 | cut -d' ' -f2)
    [ -n "$c" ] && corpus=$c
    run=$((run + 1))
    # 72 is libFuzzer's exit code when interrupted (our stop at the CPU budget).
    if ((rc != 0 && rc != 72)); then
      crashes=$((crashes + 1))
      grep -m1 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | sed "s/^/$t run $run: /"
      ((run < 50)) || break
    else
      break
    fi
  done
  result="no crash"
  if ((crashes)); then
    result="$crashes run(s) crashed: see artifacts/$t/"
    status=1
  fi
  printf '%s\t%s CPU-s\t%s wall-s\t%s execs\tcorpus %s\t%s\n' \
    "$t" "$((used / tick))" "$wall" "$execs" "$corpus" "$result" |
    tee -a logs/summary.tsv
done
exit $status
