#!/usr/bin/env bash
# Every file's CUDA preset (`python FILE.py --device cuda`), all at once on one GPU, then the wanted GPU rows.
# The presets run side by side to fit a short lease: their val losses are theirs, their tokens/s are not (they
# share the GPU and the CPUs); the GPU rows that follow run alone and are the speed figures.
#   bash benchmarks/gpu_presets.sh OUT_DIR [PRESET_SECONDS] [ROWS_SECONDS] [BENCH ...]
# Offline machines: put GPT-2's tiktoken files in .gpu/tiktoken and tiny-shakespeare in .gpu/tinyshakespeare.txt.
set -u
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_presets.sh OUT_DIR [PRESET_SECONDS] [ROWS_SECONDS] [BENCH ...]}
preset_s=${2:-300}
rows_s=${3:-240}
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out/presets"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
[ -d .gpu/tiktoken ] && export TIKTOKEN_CACHE_DIR="$PWD/.gpu/tiktoken"
data=shakespeare
[ -f .gpu/tinyshakespeare.txt ] && data=.gpu/tinyshakespeare.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/machine.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$out/machine.txt"
start=$(date +%s)
for f in gpt2 llama2 mixtral mla_moe mamba lora bitnet infini_attention jamba mamba2 transformer_xl; do
  ( timeout "$preset_s" python "$f.py" --device cuda --data "$data" --out_dir "out/gpu_$f" \
      > "$out/presets/$f.log" 2>&1; echo "exit $?" >> "$out/presets/$f.log" ) &
done
wait
echo "presets: $(( $(date +%s) - start )) s"
for f in "$out"/presets/*.log; do
  echo "== $(basename "$f" .log): $(grep -m1 " | cuda" "$f" | cut -c1-160)"
  grep -E '^(eval|done)|Error|error|exit' "$f" | tail -n 4
done | tee "$out/presets_summary.txt"
tar -czf "$out/presets.tar.gz" -C "$out" presets && rm -r "$out/presets"
[ $# -gt 0 ] && timeout "$rows_s" python benchmarks/gpu_rows.py "$@" --json "$out/gpu_rows.json" 2>&1 \
  | tee "$out/gpu_rows.log"
exit 0
