#!/usr/bin/env bash
# llm-data trains a tokenizer (tokenizer.vocab_size) when tokenizer.path does not exist yet:
#   LLaMA's conventions: unk 0, BOS 1, EOS 2, 384 pieces, byte fallback (a character with no piece
#   round-trips as bytes);
#   the same corpus and settings give the same tokenizer.model, byte for byte;
#   the shards hold Python sentencepiece's ids of each document (one per line), BOS first, EOS last.
# usage: tokenizer_tests.sh BIN_DIR RECIPE PYTHON WORK_DIR
set -euo pipefail
bin=$1 recipe=$2 py=$3 work=$4
[ -n "$py" ] || { echo "no python3 with sentencepiece: install python3-sentencepiece (scripts/install-deps.sh)"; exit 1; }
rm -rf "$work" && mkdir -p "$work"
fixtures=$(cd "$(dirname "$0")/../fixtures" && pwd)
{ cat "$fixtures/eval.txt"; echo "Le café est naïve, déjà vu: 3.14 × 2."; } > "$work/corpus.txt"
for run in a b; do
  "$bin/llm-data" "$recipe" --set tokenizer.path="$work/$run/tok.model" --set tokenizer.vocab_size=384 \
    --set "data_prep.inputs=[$work/corpus.txt]" --set data_prep.output="$work/$run/shards" --set data_prep.valid_every=0 \
    --set data_prep.bos=true > "$work/$run.log" 2>&1 || { cat "$work/$run.log"; exit 1; }
done
grep -q "training a bpe tokenizer of 384 pieces" "$work/a.log" || { cat "$work/a.log"; echo "no tokenizer trained"; exit 1; }
cmp "$work/a/tok.model" "$work/b/tok.model" || { echo "two trainings differ"; exit 1; }
"$py" - "$work" <<'PY'
import json, sys
import sentencepiece as spm
work = sys.argv[1]
sp = spm.SentencePieceProcessor(model_file=work + "/a/tok.model")
assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.get_piece_size()) == (0, 1, 2, 384), \
    (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.get_piece_size())
text = "naïve tea \U0001F375 at 10:45"
ids = sp.encode(text)
assert sp.decode(ids) == text, sp.decode(ids)
assert any(sp.id_to_piece(i) == "<0xF0>" for i in ids), [sp.id_to_piece(i) for i in ids]  # the tea cup, as bytes
meta = json.load(open(work + "/a/shards/meta.json"))
tokens = []
for s in meta["shards"]:
    raw = open(work + "/a/shards/" + s["file"], "rb").read()
    tokens += [int.from_bytes(raw[i:i + 2], "little") for i in range(0, len(raw), 2)]
docs = [line.rstrip("\n") for line in open(work + "/corpus.txt", encoding="utf-8") if line.strip()]
want = []
for d in docs:
    want += [1] + sp.encode(d) + [2]
assert meta["total_documents"] == len(docs), (meta["total_documents"], len(docs))
assert tokens == want, f"shards differ from sentencepiece: {len(tokens)} vs {len(want)} tokens"
print(f"tokenizer: 384 pieces, unk/bos/eos 0/1/2, byte fallback; shards = sentencepiece's ids "
      f"({len(docs)} documents, {len(tokens)} tokens)")
PY
echo "tokenizer ok"
