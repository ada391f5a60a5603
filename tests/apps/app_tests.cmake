# Program-level tests: real runs on the fixtures, and bad input giving one error line.
set(_bin ${CMAKE_BINARY_DIR}/bin)
set(_fx ${CMAKE_CURRENT_SOURCE_DIR}/fixtures)
set(_bad ${CMAKE_CURRENT_SOURCE_DIR}/apps/bad)
set(_src ${PROJECT_SOURCE_DIR})

# expect_error(NAME REGEX COMMAND...)
function(expect_error name regex)
  string(REPLACE ";" "@@" _cmd "${ARGN}")
  add_test(NAME apps.error.${name}
           COMMAND ${CMAKE_COMMAND} "-DCMD=${_cmd}" "-DREGEX=${regex}" -P ${CMAKE_CURRENT_SOURCE_DIR}/apps/expect_error.cmake
           WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
endfunction()

# expect_run_error(NAME REGEX COMMAND...): expect_error for a training command, in a run folder of its own
# (ctest -j runs them side by side, and a second job in a run folder is refused before its own error).
function(expect_run_error name regex)
  expect_error(${name} "${regex}" ${ARGN} --set train.run_dir=${CMAKE_BINARY_DIR}/app-test-run/error-${name})
endfunction()

# expect_output(NAME REGEX COMMAND...): exit 0 and output matching REGEX.
function(expect_output name regex)
  string(REPLACE ";" "@@" _cmd "${ARGN}")
  add_test(NAME ${name}
           COMMAND ${CMAKE_COMMAND} "-DCMD=${_cmd}" "-DREGEX=${regex}" -P ${CMAKE_CURRENT_SOURCE_DIR}/apps/expect_output.cmake
           WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
endfunction()

# llm-plan prints the published exact counts.
expect_output(apps.plan.llama-7b "total +6,738,415,616"
              ${_bin}/llm-plan ${_src}/recipes/llama-7b.yaml)
# "--" ends the options: what follows is positional (a recipe whose name starts with a dash).
expect_output(apps.plan.end-of-options "total +6,738,415,616" ${_bin}/llm-plan -- ${_src}/recipes/llama-7b.yaml)
expect_output(apps.plan.llama-65b "total +65,285,660,672"
              ${_bin}/llm-plan ${_src}/recipes/llama-65b.yaml)
expect_output(apps.plan.k2-65b "total +65,286,184,960"
              ${_bin}/llm-plan ${_src}/recipes/k2-65b.yaml)
# (2040 sequences do not divide among 480 ranks: said, with GPU counts they divide among)
expect_output(apps.plan.k2-65b-cluster "is not a multiple of 1 seq x 2048 tokens x 480 GPUs = 983040: llm-pretrain refuses.*GPU counts it divides among: 408 or 510.*fits: zero3 with activation checkpointing \\(24.5 of 80 GiB per GPU\\).*147,456 tokens/s.*111.1 days"
              ${_bin}/llm-plan ${_src}/recipes/k2-65b.yaml --gpus 480 --gpu-memory 80GiB --mfu 0.4)
# A LoRA fine-tune of a 7B base on one 24 GiB card (the base folder is absent: the recipe's model).
expect_output(apps.plan.amber-7b-lora "model: the recipe's model section \\(finetune.base models/Amber is not here\\).*39,976,960 adapter parameters train.*fits: none with activation checkpointing \\(18.1 of 24 GiB per GPU\\)"
              ${_bin}/llm-plan ${_src}/recipes/amber-7b-lora.yaml --gpus 1 --gpu-memory 24GiB)
# A LoRA fine-tune of a 65B base on one node of 8 x 80 GB: only ZeRO-3 (the frozen base sharded) fits,
# at the recipe's H100 peak (train.peak_tflops 989).
expect_output(apps.plan.k2-65b-lora "peak 989 TFLOP/s.*199,884,800 adapter parameters train.*zero2 +122.3 .*fits: zero3 with activation checkpointing \\(34.6 of 80 GiB per GPU\\).*11,458 tokens/s"
              ${_bin}/llm-plan ${_src}/recipes/k2-65b-lora.yaml --gpus 8 --gpu-memory 80GiB)
expect_error(plan.bad-memory "--gpu-memory: expected a size like 80GiB or 80GB, got 'lots'"
             ${_bin}/llm-plan ${_src}/recipes/llama-7b.yaml --gpus 8 --gpu-memory lots)
expect_output(apps.plan.override "\"total\": 464531456"
              ${_bin}/llm-plan ${_src}/recipes/llama-7b.yaml --set model.n_layers=1)

# llm-eval's last stdout line is the JSON summary (its numbers are checked in tests/eval).
# The fixture's reference (expected.json, float64): 336 tokens, loss 6.151464 (1e-4: 6.1514..6.1515).
expect_output(apps.eval.tiny-llama "{\"documents\": 6, \"tokens\": 336, \"loss\": 6\\.151[45][0-9]*, \"ppl\": [0-9.]+}$"
              ${_bin}/llm-eval --checkpoint ${_fx}/tiny-llama --data ${_fx}/eval.jsonl)

# Bad input: one clear line, non-zero exit.
expect_error(plan.missing-recipe "no-such.yaml: recipe not found" ${_bin}/llm-plan no-such.yaml)
expect_error(plan.recipe-folder "recipes: is not a recipe file" ${_bin}/llm-plan ${_src}/recipes)
expect_error(plan.negative-gpus "--gpus: must be in \\[0, 10000000\\], got -8"
             ${_bin}/llm-plan ${_src}/recipes/llama-7b.yaml --gpus -8)
expect_error(plan.unknown-key "unknown-key.yaml:3: model.n_layer: unknown key.*did you mean 'n_layers'"
             ${_bin}/llm-plan ${_bad}/unknown-key.yaml)
expect_error(plan.wrong-type "model.dim: expected an integer in .1, 262144., got 'big'" ${_bin}/llm-plan ${_bad}/wrong-type.yaml)
expect_error(plan.bad-heads "model.n_kv_heads: n_heads \\(32\\) must be a multiple of n_kv_heads \\(5\\)"
             ${_bin}/llm-plan ${_src}/recipes/llama-7b.yaml --set model.n_kv_heads=5)
expect_error(plan.bad-set "unknown key 'model.layers'.*did you mean 'n_layers'"
             ${_bin}/llm-plan ${_src}/recipes/llama-7b.yaml --set model.layers=4)
expect_error(plan.unknown-option "llm-plan: error: unknown option '--sett'.*did you mean '--set'"
             ${_bin}/llm-plan ${_src}/recipes/llama-7b.yaml --sett model.dim=4)
expect_error(eval.missing-checkpoint "no-such-dir: checkpoint folder not found"
             ${_bin}/llm-eval --checkpoint no-such-dir --data ${_fx}/eval.txt)
expect_error(eval.missing-data "no-such.txt: cannot open data file"
             ${_bin}/llm-eval --checkpoint ${_fx}/tiny-llama --data no-such.txt)
expect_error(eval.bad-dtype "--dtype: unknown dtype 'fp8'"
             ${_bin}/llm-eval --checkpoint ${_fx}/tiny-llama --data ${_fx}/eval.txt --dtype fp8)
expect_error(eval.fp16-on-cpu "--dtype: is fp16, which LibTorch cannot compute on the CPU \\(hint: use bf16"
             ${_bin}/llm-eval --checkpoint ${_fx}/tiny-llama --data ${_fx}/eval.txt --dtype fp16 --device cpu)
expect_error(eval.window-before-load "--window: must be in \\[0, [0-9]+\\]"
             ${_bin}/llm-eval --checkpoint ${_fx}/tiny-llama --data ${_fx}/eval.txt --window 100000)
expect_error(generate.option-for-value "option --prompt needs a value, got the option --chat"
             ${_bin}/llm-generate --checkpoint ${_fx}/tiny-llama --prompt --chat)
expect_error(generate.option-twice "option --prompt given twice \\('Hi' and 'Bye'\\)"
             ${_bin}/llm-generate --checkpoint ${_fx}/tiny-llama --prompt Hi --prompt Bye)
expect_error(eval.bad-device "--device: unknown device 'tpu' \\(hint: use cpu, cuda or auto\\)"
             ${_bin}/llm-eval --checkpoint ${_fx}/tiny-llama --data ${_fx}/eval.txt --device tpu)
expect_error(eval.corrupt-safetensors "model.safetensors: .*header"
             ${_bin}/llm-eval --checkpoint ${_bad}/corrupt-weights --data ${_fx}/eval.txt --tokenizer ${_fx}/tokenizer.model)
expect_error(eval.tokenizer-mismatch "tokenizer has 384 tokens but the model .* has vocab_size 256"
             ${_bin}/llm-eval --checkpoint ${_bad}/small-vocab --data ${_fx}/eval.txt --tokenizer ${_fx}/tokenizer.model)
expect_error(eval.bad-jsonl "bad.jsonl:2: expected an object with a string field"
             ${_bin}/llm-eval --checkpoint ${_fx}/tiny-llama --data ${_bad}/bad.jsonl)
expect_error(eval.bad-config-json "config.json: invalid JSON"
             ${_bin}/llm-eval --checkpoint ${_bad}/bad-config --data ${_fx}/eval.txt --tokenizer ${_fx}/tokenizer.model)

# Training a tokenizer larger than the text allows names the recipe key (sentencepiece names its flag).
expect_error(data.vocab-too-high "tokenizer.vocab_size: Vocabulary size too high \\(90000\\)"
             ${_bin}/llm-data ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml
             --set tokenizer.path=${CMAKE_BINARY_DIR}/app-test-vocab/never.model --set tokenizer.vocab_size=90000
             --set data_prep.output=${CMAKE_BINARY_DIR}/app-test-vocab/out --set data_prep.valid_every=0)

expect_error(data.verify-nothing "llm-data: error: expected at least 1 positional argument\\(s\\), got 0.*llm-data verify SHARD_SET"
             ${_bin}/llm-data verify)
expect_error(data.verify-missing "/nonexistent: shard-set folder not found" ${_bin}/llm-data verify /nonexistent)

# llm-data -> llm-pretrain on the fixture documents (seconds).
set(_run ${CMAKE_BINARY_DIR}/app-test-run)
set(_sets --set data_prep.output=${_run}/train --set data_prep.valid_output=${_run}/valid
          --set data.train=[${_run}/train] --set data.valid=${_run}/valid --set train.run_dir=${_run}/run
          --set checkpoint.resume=none)
# (a new run each time: an earlier ctest's checkpoints would be moved aside, kept, beside it)
add_test(NAME apps.clean.tiny COMMAND ${CMAKE_COMMAND} -E rm -rf ${_run}/run)
set_tests_properties(apps.clean.tiny PROPERTIES FIXTURES_SETUP tiny_clean)
expect_output(apps.data.tiny "held-out: .*valid \\(2 documents"
              ${_bin}/llm-data ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml ${_sets})
set_tests_properties(apps.data.tiny PROPERTIES FIXTURES_SETUP tiny_shards FIXTURES_REQUIRED tiny_clean)
expect_output(apps.pretrain.tiny "step +4/4 .*eval [0-9.]+.*saved checkpoint .*step-00000004.*sample: Hello"
              ${_bin}/llm-pretrain ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml ${_sets})
set_tests_properties(apps.pretrain.tiny PROPERTIES FIXTURES_REQUIRED tiny_shards)
# Tokenizer training (tokenizer.vocab_size): LLaMA's ids, byte fallback, the same file twice, and
# shards holding Python sentencepiece's ids of each document.
add_test(NAME apps.data.tokenizer
         COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/apps/tokenizer_tests.sh ${_bin} ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml
                 "${LIBLLM_TEST_PYTHON}" ${CMAKE_BINARY_DIR}/tokenizer-test
         WORKING_DIRECTORY ${_src})
set_tests_properties(apps.data.tokenizer PROPERTIES PASS_REGULAR_EXPRESSION "tokenizer ok" TIMEOUT 120)
if(NOT LIBLLM_CUDA)
  expect_run_error(pretrain.cuda-without-cuda "train.device: is 'cuda' but no CUDA device is usable"
               ${_bin}/llm-pretrain ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml --set train.device=cuda ${_sets})
endif()
expect_run_error(pretrain.bad-sharding "train.sharding=zero4: expected one of: none, zero1, zero2, zero3, hybrid"
             ${_bin}/llm-pretrain ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml --set train.sharding=zero4)
expect_run_error(pretrain.zero3-needs-checkpointing "train.activation_checkpointing: must be true with train.sharding zero3"
             ${_bin}/llm-pretrain ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml --set train.sharding=zero3 ${_sets})
expect_run_error(pretrain.bad-shard-group "train.shard_group: 2 ranks per shard group do not divide the 1 ranks"
             ${_bin}/llm-pretrain ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml --set train.sharding=hybrid
             --set train.activation_checkpointing=true --set train.shard_group=2 ${_sets})
set_tests_properties(apps.error.pretrain.zero3-needs-checkpointing apps.error.pretrain.bad-shard-group
                     PROPERTIES FIXTURES_REQUIRED tiny_shards)
expect_run_error(pretrain.missing-shards "data.train: /nonexistent: shard-set folder not found"
             ${_bin}/llm-pretrain ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml --set data.train=[/nonexistent])

# Data parallel over Gloo: 2 processes == 1 process with doubled accumulation (1e-6). Needs Gloo's
# headers beside LibTorch (libllm/CMakeLists.txt; Debian: libgloo-dev; a pip LibTorch has none, and
# then libllm has NCCL only).
if(LIBLLM_GLOO_INCLUDE)
  add_test(NAME apps.pretrain.ddp-gloo
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/apps/ddp_equivalence.sh ${_bin} ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml
                   ${CMAKE_BINARY_DIR}/ddp-test -- ${_sets}
           WORKING_DIRECTORY ${_src})
  set_tests_properties(apps.pretrain.ddp-gloo PROPERTIES FIXTURES_REQUIRED tiny_shards TIMEOUT 300)
  # ZeRO-1/2/3 (and hybrid, with zero3): 2 and 3 sharded ranks == 1 unsharded process; a 3-rank
  # checkpoint resumes on 2 and 1; zero3's per-rank state memory on 2 ranks <= 60% of unsharded.
  foreach(_stage zero1 zero2 zero3)
    add_test(NAME apps.pretrain.${_stage}
             COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/apps/zero_tests.sh ${_bin} ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml
                     ${CMAKE_BINARY_DIR}/${_stage}-test ${_stage} -- ${_sets}
             WORKING_DIRECTORY ${_src})
    set_tests_properties(apps.pretrain.${_stage} PROPERTIES FIXTURES_REQUIRED tiny_shards TIMEOUT 900
                         PASS_REGULAR_EXPRESSION "${_stage} ok")
  endforeach()
else()
  message(WARNING "libllm: no gloo headers beside LibTorch (Debian: libgloo-dev): the CPU data-parallel and "
                  "ZeRO tests are not registered")
endif()

# CUDA training (label gpu): CPU == CUDA, resume, a 1-rank NCCL group, bf16.
if(LIBLLM_CUDA)
  add_test(NAME apps.pretrain.cuda
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cuda/cuda_train.sh ${_bin} ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml
                   ${CMAKE_BINARY_DIR}/cuda-test -- ${_sets}
           WORKING_DIRECTORY ${_src})
  set_tests_properties(apps.pretrain.cuda PROPERTIES FIXTURES_REQUIRED tiny_shards TIMEOUT 300 LABELS gpu)
endif()

# Loss spikes: supervisor restarts (kill -9, hang, guard stop) and analysis of injected spikes.
foreach(_mode kill hang heartbeat stop analyze noprogress repeated)
  add_test(NAME apps.spike.${_mode}
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/apps/spike_tests.sh ${_bin} ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml
                   ${CMAKE_BINARY_DIR}/spike-test-${_mode} ${_mode} -- ${_sets}
           WORKING_DIRECTORY ${_src})
  set_tests_properties(apps.spike.${_mode} PROPERTIES FIXTURES_REQUIRED tiny_shards TIMEOUT 300)
endforeach()
expect_error(spike.bad-command "llm-spike: error: llm-spike: unknown command 'analyse'.*llm-spike analyze RUN_DIR"
             ${_bin}/llm-spike analyse x)
expect_error(spike.bad-lr-factor "--lr-factor: expected a number in \\(0, 1\\], got '2'"
             ${_bin}/llm-spike supervise ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml --lr-factor 2)
expect_error(spike.no-run "no-such-run: run folder not found" ${_bin}/llm-spike analyze no-such-run)
expect_run_error(pretrain.guard-keep-last "checkpoint.keep_last: must be >= 2 with guard.enabled"
             ${_bin}/llm-pretrain ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml --set guard.enabled=true
             --set checkpoint.keep_last=1 ${_sets})
expect_run_error(pretrain.guard-bad-defer "guard.defer=later: expected one of: end, drop, got 'later'"
             ${_bin}/llm-pretrain ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml --set guard.defer=later)

# Fine-tuning: llm-finetune (LoRA, chat data) -> llm-export (merged + PEFT) -> llm-eval -> llm-generate.
add_test(NAME apps.finetune.pipeline
         COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/apps/finetune_tests.sh ${_bin} ${_src} ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml
                 ${CMAKE_BINARY_DIR}/finetune-test -- ${_sets}
         WORKING_DIRECTORY ${_src})
set_tests_properties(apps.finetune.pipeline PROPERTIES FIXTURES_REQUIRED tiny_shards TIMEOUT 300
                     PASS_REGULAR_EXPRESSION "finetune pipeline ok")
expect_run_error(finetune.no-base "finetune.base: is required for fine-tuning"
             ${_bin}/llm-finetune ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml)
expect_run_error(finetune.malformed-chat "bad-chat.jsonl:2: invalid JSON.*chat.malformed: skip"
             ${_bin}/llm-finetune ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-finetune.yaml
             --set chat.files=[${_bad}/bad-chat.jsonl] --set train.seq_len=47)
expect_run_error(finetune.bad-target "lora.targets: 'qkv' names no projection"
             ${_bin}/llm-finetune ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-finetune.yaml
             --set finetune.method=lora --set lora.targets=[qkv] ${_sets})
set_tests_properties(apps.error.finetune.bad-target PROPERTIES FIXTURES_REQUIRED tiny_shards)
# A model section that contradicts the base (a pretraining recipe reused): the base decides.
expect_run_error(finetune.model-conflict "model.dim: is 32, but the base .*tiny-llama has 64"
             ${_bin}/llm-finetune ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml --set finetune.base=${_fx}/tiny-llama)
expect_run_error(finetune.bad-method "finetune.method=qlora: expected one of: full, lora"
             ${_bin}/llm-finetune ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml --set finetune.method=qlora)
expect_error(generate.no-set "llm-generate: error: unknown option '--set'"
             ${_bin}/llm-generate --checkpoint ${_fx}/tiny-llama --prompt hi --set chat.system_prompt=x)
expect_error(generate.flag-value "option --no-cache takes no value, got 'false'"
             ${_bin}/llm-generate --checkpoint ${_fx}/tiny-llama --prompt hi --no-cache=false)
expect_error(generate.no-prompt "--prompt: is required without --chat"
             ${_bin}/llm-generate --checkpoint ${_fx}/tiny-llama)
expect_error(export.system-without-template "--system: sets the default system text of a libllm chat template.*--chat-template"
             ${_bin}/llm-export --checkpoint ${_fx}/tiny-llama --out ${CMAKE_BINARY_DIR}/x-export-system --system hi)
expect_error(export.adapter-of-plain "--adapter: .* is not a LoRA fine-tuning checkpoint"
             ${_bin}/llm-export --checkpoint ${_fx}/tiny-llama --out ${CMAKE_BINARY_DIR}/x-export-adapter --adapter ${CMAKE_BINARY_DIR}/x-adapter)
# Output folders: never the checkpoint (or inside or around it), never each other, never a folder
# that is not an earlier export (a run folder); "out/" names out; an earlier export is replaced.
add_test(NAME apps.export.folders
         COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/apps/export_tests.sh ${_bin} ${_src} ${CMAKE_BINARY_DIR}/export-test
         WORKING_DIRECTORY ${_src})
set_tests_properties(apps.export.folders PROPERTIES TIMEOUT 120 PASS_REGULAR_EXPRESSION "export folders ok")

# Failures: a full disk while saving (previous checkpoint intact), a dead data-parallel peer (no hang),
# sharded ranks whose run folders differ (an error on every rank, no incomplete checkpoint).
set(_failure_modes full-disk damaged-file damaged-shard interrupted-data)
if(LIBLLM_GLOO_INCLUDE)
  list(APPEND _failure_modes dead-peer unshared-run-dir damaged-shard-ranks)
endif()
foreach(_mode ${_failure_modes})
  add_test(NAME apps.failure.${_mode}
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/apps/failure_tests.sh ${_bin} ${CMAKE_CURRENT_SOURCE_DIR}/apps/tiny-pretrain.yaml
                   ${CMAKE_BINARY_DIR}/failure-test-${_mode} ${_mode} -- ${_sets}
           WORKING_DIRECTORY ${_src})
  set_tests_properties(apps.failure.${_mode} PROPERTIES FIXTURES_REQUIRED tiny_shards TIMEOUT 200
                       PASS_REGULAR_EXPRESSION "${_mode} ok")
endforeach()
