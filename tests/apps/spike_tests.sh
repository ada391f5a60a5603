#!/usr/bin/env bash
# llm-spike end to end on the tiny recipe.
# usage: spike_tests.sh BIN_DIR RECIPE WORK_DIR MODE -- [--set ...]
#   kill     kill -9 of the trainer under `llm-spike supervise`: restarted, same final weights as an uninterrupted run
#   noprogress  a job whose restart runs no step is not restarted again
#   repeated    a job that fails the same way 3 times in a row (a checkpoint save over a file-size limit) is not restarted again
#   hang     an injected hang: the supervisor kills and restarts the job, which finishes
#   heartbeat   a long phase that beats the heartbeat (as a slow checkpoint write does) is no hang;
#            one that stops beating is, and the supervisor names what it was doing; a --set missing
#            from the launch command is an error; a job does not outlive a killed supervisor
#   stop     the guard gives up in-loop (max_rollbacks 0) under a launcher that exits 1: the supervisor
#            restarts with a plan, the job finishes
#   analyze  a run with a one-step and a persistent injected spike: analyze lists both with their step ranges
set -euo pipefail
bin=$1 recipe=$2 work=$3 mode=$4; shift 5
rm -rf "$work" && mkdir -p "$work"
common=(--set train.steps=300 --set train.log_every=1000 --set train.eval_every=0 --set train.sample_prompts=[]
        --set checkpoint.every=25 --set checkpoint.resume=auto --set train.plot=false "$@")
guard=(--set guard.enabled=true --set guard.window=16 --set guard.min_history=8 --set guard.grad_z=0
       --set guard.persist_steps=3 --set guard.rewarm_steps=5 --set checkpoint.every=5 --set checkpoint.keep_last=4)
fail() { echo "FAILED: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -20 "$f"; done; exit 1; }
job_of() {  # the job under supervisor $1: its child that leads its own process group (not the watchdog)
  local c
  for c in $(pgrep -P "$1"); do [ "$(ps -o pgid= -p "$c" | tr -d ' ')" = "$c" ] && echo "$c" && return; done
  return 0
}

case $mode in
kill)
  "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$work/straight" > "$work/straight.log" 2>&1
  "$bin/llm-spike" supervise "$recipe" "${common[@]}" --set train.run_dir="$work/supervised" --hang-seconds 60 \
    > "$work/supervise.log" 2>&1 &
  sup=$!
  n=0
  for _ in $(seq 1 2400); do  # until the trainer is past step 60 (past 2 checkpoints), then kill -9 it
    n=$(wc -l < "$work/supervised/metrics.jsonl" 2>/dev/null || echo 0)
    [ "$n" -ge 60 ] && break
    sleep 0.05
  done
  [ "$n" -ge 60 ] || fail "the supervised trainer did not reach step 60 in 2 minutes (step $n)"
  child=$(job_of "$sup")
  [ -n "$child" ] || fail "no trainer under the supervisor"
  kill -9 "$child"
  echo "killed trainer $child at step $n"
  wait "$sup" || fail "supervisor exit code $?"
  grep -q "killed by signal 9" "$work/supervise.log" || fail "no restart after kill -9"
  grep -q "resumed from" "$work/supervise.log" || fail "the restarted trainer did not resume"
  for f in model.safetensors optimizer.safetensors; do
    cmp "$work/straight/checkpoints/step-00000300/$f" "$work/supervised/checkpoints/step-00000300/$f" || fail "$f differs"
  done
  echo "same final weights and optimizer state as the uninterrupted run"
  ;;
noprogress)
  # A job that finished its steps but whose launcher then exits 1 makes no progress when restarted
  # (every step is done): the supervisor gives up instead of restarting it --max-restarts times.
  "$bin/llm-spike" supervise "$recipe" "${common[@]}" --set train.steps=20 --set train.run_dir="$work/run" \
    -- sh -c '"$@"; exit 1' launcher "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.steps=20 \
    --set train.run_dir="$work/run" > "$work/supervise.log" 2>&1 && fail "the supervisor did not fail"
  grep -q "restarting (1/5)" "$work/supervise.log" || fail "no restart after the first attempt's progress"
  grep -q "failed with exit code 1 before making progress: not restarting" "$work/supervise.log" || fail "restarted without progress"
  ! grep -q "restarting (2/5)" "$work/supervise.log" || fail "restarted again"
  ;;
repeated)
  # A checkpoint save that fails the same way on every attempt (a file-size limit, as a full disk
  # would): the supervisor stops at the third identical failure, not after --max-restarts.
  "$bin/llm-spike" supervise "$recipe" "${common[@]}" --set train.steps=60 --set train.run_dir="$work/run" \
    -- sh -c 'trap "" XFSZ; ulimit -f 100; exec "$@"' launcher "$bin/llm-pretrain" "$recipe" "${common[@]}" \
    --set train.steps=60 --set train.run_dir="$work/run" > "$work/supervise.log" 2>&1 && fail "the supervisor did not fail"
  grep -q "restarting (2/5)" "$work/supervise.log" || fail "no restart after the second failure"
  grep -q "failed the same way 3 times in a row (exit code 1 after steps 1..25): not restarting" \
    "$work/supervise.log" || fail "no stop at the repeated failure"
  ! grep -q "restarting (3/5)" "$work/supervise.log" || fail "restarted again"
  grep -q '"event":"give_up","reason":"the same failure 3 times' "$work/run/events.jsonl" || fail "no give_up event"
  ;;
hang)
  "$bin/llm-spike" supervise "$recipe" "${common[@]}" --set train.steps=60 --set guard.inject_hang_step=30 \
    --set train.run_dir="$work/run" --hang-seconds 3 > "$work/supervise.log" 2>&1 || fail "supervisor failed"
  grep -q "hang: no new metrics line or heartbeat for 3 s; restarting (1/5)" "$work/supervise.log" || fail "no hang restart"
  grep -q '"event":"finished"' "$work/run/events.jsonl" || fail "did not finish"
  cat "$work/supervise.log" | grep "llm-spike"
  ;;
heartbeat)
  run=("${common[@]}" --set train.steps=10 --set train.run_dir="$work/run")
  beat='echo "$(date +%s) writing slow.safetensors" > "$LIBLLM_HEARTBEAT"'
  "$bin/llm-spike" supervise "$recipe" "${run[@]}" --hang-seconds 8 -- sh -c \
    "for i in $(seq -s ' ' 20); do $beat; sleep 0.5; done; \"\$@\"" launcher "$bin/llm-pretrain" "$recipe" "${run[@]}" \
    > "$work/beating.log" 2>&1 || fail "a beating job was not left to finish"
  grep -q "the job finished (attempt 0)" "$work/beating.log" || fail "restarted a beating job"
  "$bin/llm-spike" supervise "$recipe" "${run[@]}" --hang-seconds 3 --max-restarts 0 -- sh -c "$beat; sleep 30" launcher "${run[@]}" \
    > "$work/stuck.log" 2>&1 && fail "a stuck job was not stopped"
  grep -q "hang: no new metrics line or heartbeat for 3 s (last heartbeat: writing slow.safetensors); giving up" \
    "$work/stuck.log" || fail "the hang does not name the phase"
  "$bin/llm-spike" supervise "$recipe" "${run[@]}" -- "$bin/llm-pretrain" "$recipe" > "$work/noset.log" 2>&1 &&
    fail "a launch command without the --set options was run"
  grep -q "given to llm-spike supervise but not to the launch command" "$work/noset.log" || fail "no --set error"
  "$bin/llm-spike" supervise "$recipe" "${run[@]}" -- "$bin/llm-pretrain" "$recipe" "${run[@]}" \
    --set train.run_dir="$work/other" > "$work/otherdir.log" 2>&1 && fail "a job writing another run folder was run"
  grep -q "in the launch command, but llm-spike supervise watches train.run_dir" "$work/otherdir.log" ||
    fail "no run_dir error"
  # No job outlives its supervisor: a kill -9 of the supervisor's process group ends the job's, also
  # the processes a launcher started (here a shell that does not exec its command).
  setsid "$bin/llm-spike" supervise "$recipe" "${run[@]}" --hang-seconds 60 -- sh -c 'sleep 61 || exit 1' launcher \
    "${run[@]}" > "$work/orphan.log" 2>&1 &
  sup=$! rank=
  for _ in $(seq 1 600); do  # (30 s: a loaded 2-core machine starts it late)
    launcher=$(job_of "$sup")
    [ -n "$launcher" ] && rank=$(pgrep -P "$launcher") && [ -n "$rank" ] && break
    sleep 0.05
  done
  [ -n "$rank" ] || fail "no job under the supervisor"
  kill -9 -- "-$sup"
  wait "$sup" 2>/dev/null || true
  alive() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ "$st" != Z ]; }
  for _ in $(seq 1 300); do alive "$rank" || alive "$launcher" || break; sleep 0.05; done
  ! alive "$rank" && ! alive "$launcher" || { kill "$rank" "$launcher"; fail "the job outlived its supervisor"; }
  cat "$work/stuck.log"
  ;;
stop)
  # Under a launcher that exits 1 when a worker exits 3 (as torchrun does): the stop event decides.
  run=("${common[@]}" "${guard[@]}" --set train.steps=60 --set guard.max_rollbacks=0 --set guard.inject_lr_steps=[30]
       --set guard.inject_lr_factor=1000 --set train.run_dir="$work/run")
  "$bin/llm-spike" supervise "$recipe" "${run[@]}" -- sh -c '"$@" || exit 1' launcher "$bin/llm-pretrain" "$recipe" \
    "${run[@]}" > "$work/supervise.log" 2>&1 || fail "supervisor failed"
  grep -q "unresolved spike .*restart from step 25 with the data of steps 26..34 deferred to the end" "$work/supervise.log" || fail "no plan"
  grep -q "restart plan: continuing from step 25" "$work/supervise.log" || fail "plan not applied"
  grep -q '"event":"finished"' "$work/run/events.jsonl" || fail "did not finish"
  "$bin/llm-spike" analyze "$work/run" | tee "$work/analyze.log"
  grep -Eq "^ +[0-9]+  31-34 +malignant .*stopped the run; restarted from step 25 by plan, [0-9]+ windows deferred, LR x0.5" \
    "$work/analyze.log" || fail "analyze"
  grep -Eq "1 rollback, 1 restart" "$work/analyze.log" || fail "analyze's summary"
  ;;
analyze)
  "$bin/llm-pretrain" "$recipe" "${common[@]}" "${guard[@]}" --set train.steps=60 --set guard.inject_noise_steps=[20] \
    --set guard.inject_lr_steps=[40] --set guard.inject_lr_factor=1000 --set train.run_dir="$work/run" \
    > "$work/train.log" 2>&1 || fail "training failed"
  "$bin/llm-spike" analyze "$work/run" | tee "$work/analyze.log"
  grep -Eq "2 spikes \(1 benign, 1 malignant\), 1 rollback" "$work/analyze.log" || fail "summary"
  grep -Eq "^ +1  20 +benign .*recovered; 1 update skipped" "$work/analyze.log" || fail "benign spike at step 20"
  grep -Eq "^ +2  41-44 +malignant .*rolled back to step 35, 18 windows deferred" "$work/analyze.log" || fail "malignant 41-44"
  grep -q "<svg" "$work/run/spikes.html" || fail "no plot"
  ;;
*) echo "unknown mode $mode"; exit 2 ;;
esac
