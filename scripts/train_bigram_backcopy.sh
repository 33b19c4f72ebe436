#!/usr/bin/env bash
# Retrain the five shipped Bigram-Backcopy models exactly as shipped in
# massact_lens/models/checkpoints/bigram_backcopy/<variant>/ (one after the other, one
# CPU thread each; about 3.5-4.5 CPU minutes per variant on the project's machines).
#
#   bash scripts/train_bigram_backcopy.sh                          # overwrite the shipped models
#   bash scripts/train_bigram_backcopy.sh runs/bb                  # write them somewhere else
#   bash scripts/train_bigram_backcopy.sh runs/bb softmax1 gated   # only these variants
#
# Variants: default, sink_token, explicit_bias (massact_lens.models.explicit_bias),
# softmax1 and gated (massact_lens.models.attention_variants); --attention is the
# same flag as --variant.
#
# Recipe (the defaults of massact_lens.training; docs/training.md): task BigramBackcopy(n_tokens=64,
# n_triggers=3, zipf_exponent=1.0, concentration=0.25, seq_len=64, seed=0);
# 3 layers, 1 head, d_model 64, d_mlp 256, pre-LN, GELU, learned positions,
# PyTorch's default initialisation (--init torch; --init gpt2 gives no BOS peak);
# AdamW lr 3e-3, betas (0.9, 0.99), weight decay 0, batch 32 x 64 targets,
# 5,000 steps, seed 0. Then print the results table.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-massact_lens/models/checkpoints/bigram_backcopy}"
shift || true
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(default sink_token explicit_bias softmax1 gated)
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
for variant in "${variants[@]}"; do
    "$PY" -m massact_lens train bigram-backcopy --variant "$variant" --out "$out/$variant" \
        --steps 5000 --batch-size 32 --lr 3e-3 --beta1 0.9 --beta2 0.99 --weight-decay 0.0 \
        --seed 0 --threads 1 --seq-len 64 --task-seed 0 --init torch \
        --n-layers 3 --d-model 64 --n-heads 1 --d-mlp 256
done
tables=()
for variant in "${variants[@]}"; do tables+=("$out/$variant"); done
"$PY" -m massact_lens train table "${tables[@]}"
