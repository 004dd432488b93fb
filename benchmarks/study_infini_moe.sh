#!/usr/bin/env bash
# Infini-attention on a mixture of experts (issue 34): a small Mixtral and a dense Llama of the same active size,
# both pretrained here on tiny-shakespeare with the CPU presets, converted to Infini-attention (a compressive memory
# and a gate per head added to each attention layer), then fine-tuned briefly on passkey retrieval. Each
# infini_attention.py run prints the passkey table (1, 2, 4, 8 and 16 segments, with the memory and gated off)
# before its fine-tuning and after it; at the end the gates' sigmoid per layer and head (how much each head reads
# the memory). Logs go to $OUT/*.log, the figures to benchmarks/RESULTS.md by hand.
#
#   bash benchmarks/study_infini_moe.sh                       # CPU, about 20 minutes on two free cores
#   OUT=/tmp/study ITERS=300 DEVICE=cuda bash benchmarks/study_infini_moe.sh
#
# GPT-2's tokens (tiktoken) throughout; the exports get a tokenizer.json written from tiktoken's own ranks, which is
# how infini_attention.py --init_from finds the tokenizer of a Hugging Face directory.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/study_infini_moe}
DEVICE=${DEVICE:-cpu}
DATA=${DATA:-shakespeare}
ITERS=${ITERS:-200}  # passkey fine-tuning steps (the CPU preset: batch 4 of 4 segments of 32 tokens)
mkdir -p "$OUT"

# 1. Pretraining. mixtral.py's CPU preset: 4 layers, n_embd 128, 8 experts of SwiGLU width 384, top 2. The dense
# Llama has the same shape and one SwiGLU of width 768 = 2 x 384: the same parameters per token (the router's 1K aside).
python mixtral.py --device "$DEVICE" --data "$DATA" --out_dir "$OUT/mixtral" --export "$OUT/mixtral-hf" \
    | tee "$OUT/pretrain_mixtral.log"
python llama2.py --device "$DEVICE" --data "$DATA" --out_dir "$OUT/llama" --intermediate_size 768 \
    --export "$OUT/llama-hf" | tee "$OUT/pretrain_llama.log"

# 2. A tokenizer.json for each export: GPT-2's byte-level BPE, vocabulary and merges from tiktoken's ranks.
python - "$OUT/mixtral-hf" "$OUT/llama-hf" <<'EOF'
import json, sys, tiktoken
enc = tiktoken.get_encoding("gpt2")
ranks = enc._mergeable_ranks
bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
rest = [b for b in range(256) if b not in bs]  # GPT-2's bytes-to-characters table: these become chr(256 + i)
char = dict(zip([*bs, *rest], map(chr, [*bs, *range(256, 256 + len(rest))])))
text = lambda b: "".join(char[x] for x in b)
vocab = {text(b): r for b, r in ranks.items()}
merges = sorted(((r, text(b[:i]), text(b[i:])) for b, r in ranks.items() if len(b) > 1 for i in range(1, len(b))
                 if ranks.get(b[:i], r) < r and ranks.get(b[i:], r) < r), key=lambda m: m[0])
tok = dict(version="1.0", added_tokens=[dict(id=50256, content="<|endoftext|>", special=True)],
           pre_tokenizer=dict(type="ByteLevel", add_prefix_space=False, use_regex=True),
           model=dict(type="BPE", vocab={**vocab, "<|endoftext|>": 50256}, merges=[f"{a} {b}" for _, a, b in merges]))
for d in sys.argv[1:]:
    json.dump(tok, open(f"{d}/tokenizer.json", "w"))
EOF

# 3. Conversion and passkey fine-tuning with the memory: the table before and after, MoE against dense.
for base in mixtral llama; do
    python infini_attention.py --init_from "$OUT/$base-hf" --task passkey --device "$DEVICE" \
        --out_dir "$OUT/infini-$base" --max_iters "$ITERS" --export "$OUT/infini-$base-hf" \
        | tee "$OUT/passkey_$base.log"
done

# 4. The gates: sigmoid(beta) per layer and head, the share of each head's output read from the memory.
python - "$OUT" <<'EOF'
import sys, torch, infini_attention as ia
for base in ("mixtral", "llama"):
    model = ia.from_pretrained(f"{sys.argv[1]}/infini-{base}-hf")
    print(f"{base}: sigmoid(gate) per layer, one number per head")
    for i, block in enumerate(model.model.layers):
        print(f"  layer {i}: " + " ".join(f"{g:.3f}" for g in torch.sigmoid(block.self_attn.gate).tolist()))
EOF
