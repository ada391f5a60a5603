#!/usr/bin/env bash
# Failures while training: one clear error, a non-zero exit, nothing already written lost.
# usage: failure_tests.sh BIN_DIR RECIPE WORK_DIR MODE -- [--set ...]
#   full-disk  a checkpoint save hits the file-size limit (ulimit -f, as a full disk would): the
#              run fails naming the checkpoint, the previous checkpoint is intact, no partial folder stays
#   damaged-file  one data byte of a checkpoint file changed after it was written: a resume,
#              llm-eval and llm-export refuse it naming the file; put back, the run resumes
#   damaged-shard  one byte of a shard changed after llm-data wrote it: `llm-data verify` and a
#              training run refuse it naming the file; with data.verify=none, and in a supervisor's
#              restart (checked by the first attempt), the run trusts it
#   damaged-shard-ranks  the same on 2 Gloo ranks, which divide the files (data.verify node and
#              shared): the rank that checks the damaged one names it, the other says another rank
#              found it; both exit at once
#   interrupted-data  llm-data gets SIGTERM (as Ctrl-C: a script's background job ignores SIGINT)
#              while it tokenizes into new folders: it ends with an error, and leaves nothing behind
#   dead-peer  one of 2 Gloo ranks is killed (-9): the other fails with an error within 60 s (no hang)
#   unshared-run-dir  2 ZeRO-1 Gloo ranks, each in a working directory of its own with a relative
#              train.run_dir, so that their run folders differ (as on a filesystem that is not shared):
#              the first sharded checkpoint fails on both ranks with an error naming it (no hang), and
#              rank 0 completes no folder without rank 1's optimizer shard; likewise when a stale
#              folder of the checkpoint's partial name under rank 1's directory takes rank 1's shard
set -euo pipefail
. "$(dirname "$0")/free_port.sh"
bin=$1 recipe=$2 work=$3 mode=$4; shift 5
rm -rf "$work" && mkdir -p "$work"
common=(--set train.sample_prompts=[] --set train.plot=false --set train.eval_every=0 "$@")
fail() { echo "FAILED: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -20 "$f"; done; exit 1; }
# flip FILE: XORs the file's last byte with 1 (a safetensors file's data: its header comes first; a
# shard's last token, an EOS, becomes another token of the vocabulary)
# failed_rank PID LOG NAME: waits for PID, which must fail (not exit 0 having gone on, nor 124: hung
# until its timeout); sets rc to its exit code and err to the last error line of LOG.
failed_rank() {
  set +e
  wait "$1"
  rc=$?
  set -e
  err=$(grep "error:" "$2" | tail -n 1 || true)
  echo "$3: exit $rc: $err"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "$3 exited $rc (0 = it went on, 124 = hung)"
}
flip() {
  local size last
  size=$(stat -c %s "$1")
  last=$(od -An -t u1 -j $((size - 1)) -N 1 "$1" | tr -d ' ')
  printf "\\$(printf %03o $((last ^ 1)))" | dd of="$1" bs=1 seek=$((size - 1)) conv=notrunc status=none
}

case $mode in
full-disk)
  run="$work/run"
  "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$run" --set train.steps=4 \
    --set checkpoint.every=2 --set checkpoint.resume=none > "$work/first.log" 2>&1 || fail "first run"
  cp -r "$run/checkpoints/step-00000004" "$work/copy"
  size=$(stat -c %s "$run/checkpoints/step-00000004/model.safetensors")
  # A limit below one weights file: logs still grow, the next checkpoint cannot be written.
  limit_kb=$(( size / 1024 / 2 ))
  set +e
  ( trap '' XFSZ; ulimit -f "$limit_kb"; exec "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$run" \
      --set train.steps=6 --set checkpoint.every=2 --set checkpoint.resume=auto ) > "$work/second.log" 2>&1
  rc=$?
  set -e
  [ "$rc" -ne 0 ] || fail "the run with a full disk exited 0"
  err=$(grep "error:" "$work/second.log" | tail -n 1)
  echo "exit $rc: $err"
  [ "$(grep -c "error:" "$work/second.log")" -eq 1 ] || fail "expected one error line"
  echo "$err" | grep -q "step-00000006" || fail "the error does not name the checkpoint being written"
  for f in "$work"/copy/*; do cmp -s "$f" "$run/checkpoints/step-00000004/$(basename "$f")" || fail "step 4 changed: $f"; done
  leftovers=$(find "$run/checkpoints" -mindepth 1 -maxdepth 1 ! -name 'step-00000002' ! -name 'step-00000004')
  [ -z "$leftovers" ] || fail "left behind: $leftovers"
  echo "full-disk ok"
  ;;
dead-peer)
  port=$(free_port)
  for r in 0 1; do
    WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      timeout 120 "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$work/run" --set train.steps=100000 \
      --set checkpoint.every=0 --set checkpoint.resume=none > "$work/rank$r.log" 2>&1 &
    pids[$r]=$!
  done
  for _ in $(seq 600); do [ -s "$work/run/metrics.jsonl" ] && break; sleep 0.1; done
  [ -s "$work/run/metrics.jsonl" ] || fail "the 2-rank run did not start"
  pkill -9 -P "${pids[1]}" llm-pretrain || kill -9 "${pids[1]}"
  start=$(date +%s)
  set +e
  wait "${pids[0]}"
  rc=$?
  set -e
  took=$(( $(date +%s) - start ))
  err=$(grep "error:" "$work/rank0.log" | tail -n 1)
  echo "rank 0: exit $rc after ${took}s: $err"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "rank 0 exited $rc (124 = hung until timeout)"
  [ "$took" -le 60 ] || fail "rank 0 took ${took}s to notice"
  echo "$err" | grep -q "failed (a peer died or timed out)" || fail "rank 0 printed no error line naming the dead peer"
  echo "dead-peer ok"
  ;;
unshared-run-dir)
  bin=$(cd "$bin" && pwd) work=$(cd "$work" && pwd) recipe="$(cd "$(dirname "$recipe")" && pwd)/$(basename "$recipe")"
  tok="$(cd "$(dirname "$recipe")/../fixtures" && pwd)/tokenizer.model"
  for case in missing stale; do
    mkdir -p "$work/$case/0" "$work/$case/1"
    if [ "$case" = stale ]; then mkdir -p "$work/$case/1/run/checkpoints/step-00000002.tmp-sharded"; fi
    port=$(free_port)
    for r in 0 1; do
      ( cd "$work/$case/$r" && WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 \
          MASTER_PORT=$port exec timeout 120 "$bin/llm-pretrain" "$recipe" "${common[@]}" --set tokenizer.path="$tok" \
          --set train.run_dir=run --set train.sharding=zero1 --set train.steps=4 --set checkpoint.every=2 \
          --set checkpoint.resume=none ) > "$work/$case-rank$r.log" 2>&1 &
      pids[$r]=$!
    done
    for r in 0 1; do
      failed_rank "${pids[$r]}" "$work/$case-rank$r.log" "$case: rank $r"
      echo "$err" | grep -q "step-00000002" || fail "$case: rank $r: the error does not name the checkpoint"
      echo "$err" | grep -q "every rank must see the same run folder" || fail "$case: rank $r: no shared-filesystem hint"
    done
    left=$(ls -A "$work/$case/0/run/checkpoints" 2>/dev/null || true)
    [ -z "$left" ] || fail "$case: rank 0's checkpoints folder holds: $left"
  done
  echo "unshared-run-dir ok"
  ;;
damaged-file)
  # One data byte of a checkpoint file changed after it was written (a disk or copy error): every
  # program that reads the file refuses it, naming it; put back, the run resumes.
  run="$work/run"
  "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$run" --set train.steps=4 \
    --set checkpoint.every=2 --set checkpoint.resume=none > "$work/first.log" 2>&1 || fail "first run"
  ck="$run/checkpoints/step-00000004"
  refused() {  # refused LOG FILE: one error line naming FILE's checksum
    grep -q "error: $2: the data does not match the checksum its writer recorded" "$1" || fail "no checksum error in $1"
  }
  cp "$ck/model.safetensors" "$work/model.copy"
  flip "$ck/model.safetensors"
  ! cmp -s "$ck/model.safetensors" "$work/model.copy" || fail "the byte was not changed"
  "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$run" --set train.steps=6 \
    --set checkpoint.every=2 --set checkpoint.resume=auto > "$work/resume.log" 2>&1 && fail "resumed from a damaged file"
  refused "$work/resume.log" "$ck/model.safetensors"
  "$bin/llm-eval" --checkpoint "$ck" --data tests/fixtures/eval.txt > "$work/eval.log" 2>&1 && fail "evaluated a damaged file"
  refused "$work/eval.log" "$ck/model.safetensors"
  "$bin/llm-export" --checkpoint "$ck" --out "$work/export" > "$work/export.log" 2>&1 && fail "exported a damaged file"
  refused "$work/export.log" "$ck/model.safetensors"
  [ ! -e "$work/export" ] || fail "a failed export left its folder"
  cp "$work/model.copy" "$ck/model.safetensors"
  cp "$ck/optimizer.safetensors" "$work/optimizer.copy"
  flip "$ck/optimizer.safetensors"
  "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$run" --set train.steps=6 \
    --set checkpoint.every=2 --set checkpoint.resume=auto > "$work/resume2.log" 2>&1 && fail "resumed from a damaged optimizer file"
  refused "$work/resume2.log" "$ck/optimizer.safetensors"
  cp "$work/optimizer.copy" "$ck/optimizer.safetensors"
  "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$run" --set train.steps=6 \
    --set checkpoint.every=2 --set checkpoint.resume=auto > "$work/resume3.log" 2>&1 || fail "no resume from the file put back"
  grep -q "resumed from" "$work/resume3.log" || fail "did not resume"
  echo "damaged-file ok"
  ;;
damaged-shard | damaged-shard-ranks)
  train="" valid=""
  for a in "$@"; do
    case $a in
      data.train=\[*\]) train=${a#data.train=[}; train=${train%]} ;;
      data.valid=*) valid=${a#data.valid=} ;;
    esac
  done
  [ -d "$train" ] && [ -d "$valid" ] || fail "no data.train / data.valid folders in the arguments"
  damaged="the data does not match the checksum meta.json recorded"
  cp -r "$train" "$work/train" && cp -r "$valid" "$work/valid"
  if [ "$mode" = damaged-shard ]; then
    "$bin/llm-data" verify "$train" "$valid" > "$work/verify-ok.log" 2>&1 || fail "llm-data verify refused good sets"
    [ "$(grep -c "the checksums match" "$work/verify-ok.log")" -eq 2 ] || fail "llm-data verify did not report both sets"
    flip "$work/train/shard-00000.bin"
    "$bin/llm-data" verify "$work/train" > "$work/verify.log" 2>&1 && fail "llm-data verify passed a damaged shard"
    grep -q "error: $work/train/shard-00000.bin: $damaged" "$work/verify.log" || fail "llm-data verify: no error naming the shard"
    # (several sets: each is checked, each damaged one named)
    "$bin/llm-data" verify "$work/train" "$valid" > "$work/verify2.log" 2>&1 && fail "llm-data verify passed a damaged set"
    grep -q "error: $work/train/shard-00000.bin: $damaged" "$work/verify2.log" &&
      grep -q "$valid: 1 shard(s), .*the checksums match" "$work/verify2.log" &&
      grep -q "error: 1 of the 2 shard sets failed" "$work/verify2.log" || fail "llm-data verify of two sets"
    "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$work/run" --set train.steps=1 \
      --set checkpoint.every=0 --set checkpoint.resume=none --set data.train=["$work/train"] > "$work/train.log" 2>&1 &&
      fail "trained on a damaged shard"
    [ "$(grep -c "error:" "$work/train.log")" -eq 1 ] || fail "expected one error line"
    grep -q "error: data.train: $work/train/shard-00000.bin: $damaged" "$work/train.log" || fail "no error naming the shard"
    "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$work/run" --set train.steps=1 \
      --set checkpoint.every=0 --set checkpoint.resume=none --set data.train=["$work/train"] --set data.verify=none \
      > "$work/trust.log" 2>&1 || fail "data.verify=none did not train"
    grep -q "match the checksums" "$work/trust.log" && fail "data.verify=none verified"
    # A supervisor's restart (LIBLLM_RESTART > 0) does not check again what the job's earlier attempt
    # checked (the marker in its run folder), and checks what it did not (no marker: killed first).
    cp -r "$train" "$work/train2"
    "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$work/run2" --set train.steps=1 \
      --set checkpoint.every=0 --set checkpoint.resume=none --set data.train=["$work/train2"] > "$work/first.log" 2>&1 ||
      fail "the first attempt did not train"
    flip "$work/train2/shard-00000.idx"  # (not the tokens: the resume's data fingerprint would see those)
    LIBLLM_RESTART=1 "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$work/run2" --set train.steps=2 \
      --set checkpoint.every=0 --set data.train=["$work/train2"] > "$work/restart.log" 2>&1 || fail "a restart did not train"
    grep -q "data: checked by this job's earlier attempt" "$work/restart.log" || fail "a restart checked again"
    LIBLLM_RESTART=1 "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$work/run3" --set train.steps=1 \
      --set checkpoint.every=0 --set data.train=["$work/train2"] > "$work/restart3.log" 2>&1 &&
      fail "a restart with no earlier check trained on a damaged shard"
    grep -q "error: data.train: $work/train2/shard-00000.idx: $damaged" "$work/restart3.log" || fail "restart: no error naming the file"
  else
    flip "$work/valid/shard-00000.bin"
    for how in node shared; do
      port=$(free_port)
      for r in 0 1; do
        WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
          timeout 120 "$bin/llm-pretrain" "$recipe" "${common[@]}" --set train.run_dir="$work/run-$how" --set train.steps=1 \
          --set checkpoint.every=0 --set checkpoint.resume=none --set data.train=["$work/train"] \
          --set data.valid="$work/valid" --set data.verify=$how > "$work/$how-rank$r.log" 2>&1 &
        pids[$r]=$!
      done
      named=0 others=0
      for r in 0 1; do
        failed_rank "${pids[$r]}" "$work/$how-rank$r.log" "$how: rank $r"
        if echo "$err" | grep -q "error: data.valid: $work/valid/shard-00000.bin: $damaged"; then named=$((named + 1)); fi
        if echo "$err" | grep -q "1 other rank(s) found a damaged shard file"; then others=$((others + 1)); fi
      done
      [ "$named" -eq 1 ] && [ "$others" -eq 1 ] || fail "$how: expected one rank naming the file and one naming the other"
    done
  fi
  echo "$mode ok"
  ;;
interrupted-data)
  mkdir -p "$work/in"
  awk 'BEGIN { for (i = 0; i < 300000; i++) print "a line of plain text that the tokenizer cuts into pieces", i }' \
    > "$work/in/big.txt"
  out="$work/new/sets"
  "$bin/llm-data" "$recipe" "${common[@]}" --set data_prep.inputs=["$work/in"] --set data_prep.output="$out/train" \
    --set data_prep.valid_output="$out/valid" --set data_prep.threads=1 > "$work/data.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do [ -d "$out/train/.llm-data-staging" ] && break; sleep 0.05; done
  [ -d "$out/train/.llm-data-staging" ] || fail "llm-data did not start tokenizing"
  kill -TERM "$pid"
  failed_rank "$pid" "$work/data.log" "llm-data"
  [ "$rc" -eq 143 ] || fail "exit $rc, not 128 + SIGTERM"
  grep -q "^llm-data: interrupted (Terminated)" "$work/data.log" || fail "no line saying it was interrupted"
  [ ! -e "$work/new" ] || fail "left behind: $(find "$work/new")"
  echo "interrupted-data ok"
  ;;
*) echo "unknown mode $mode"; exit 2 ;;
esac
