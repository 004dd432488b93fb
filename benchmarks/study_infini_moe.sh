#!/usr/bin/env bash
# Infini-attention on a mixture of experts (issue 34): a small Mixtral and a dense Llama of the same active size,
# both pretrained here on tiny-shakespeare with the CPU presets, converted to Infini-attention (a compressive memory
# and a gate per head added to each attention layer), then fine-tuned briefly on passkey retrieval. Each
# infini_attention.py run prints the passkey table (1, 2, 4, 8 and 16 segments of 32 tokens, with the memory and
# gated off) before its fine-tuning and after it; at the end the gates' sigmoid per layer and head (how much each
# head reads the memory). The two models' runs go side by side; a stage whose output exists is skipped, so a run cut
# short continues. Logs in $OUT/*.log; benchmarks/RESULTS.md has the figures of one run.
#
#   bash benchmarks/study_infini_moe.sh                                   # the presets' lengths
#   PRETRAIN_ITERS=100 ITERS=60 bash benchmarks/study_infini_moe.sh       # as RESULTS.md ran it (a busy 2-core CPU)
#   OUT=/tmp/study DEVICE=cuda ITERS=400 bash benchmarks/study_infini_moe.sh
#
# GPT-2's tokens (tiktoken) throughout; the exports get a tokenizer.json written from tiktoken's own ranks, which is
# how infini_attention.py --init_from finds the tokenizer of a Hugging Face directory.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/study_infini_moe}
DEVICE=${DEVICE:-cpu}
DATA=${DATA:-shakespeare}
PRETRAIN=${PRETRAIN_ITERS:+--max_iters $PRETRAIN_ITERS --eval_interval $((PRETRAIN_ITERS / 2))}  # empty: the preset's
ITERS=${ITERS:-200}  # passkey fine-tuning steps (the CPU preset: batch 4 of 4 segments of 32 tokens)
mkdir -p "$OUT"

# 1. Pretraining. mixtral.py's CPU preset: 4 layers, n_embd 128, 8 experts of SwiGLU width 384, top 2. The dense
# Llama has the same shape and one SwiGLU of width 768 = 2 x 384: the same parameters per token (the router's 1K aside).
[ -f "$OUT/mixtral-hf/model.safetensors" ] || python mixtral.py --device "$DEVICE" --data "$DATA" $PRETRAIN \
    --out_dir "$OUT/mixtral" --export "$OUT/mixtral-hf" > "$OUT/pretrain_mixtral.log" 2>&1 &
[ -f "$OUT/llama-hf/model.safetensors" ] || python llama2.py --device "$DEVICE" --data "$DATA" $PRETRAIN \
    --intermediate_size 768 --out_dir "$OUT/llama" --export "$OUT/llama-hf" > "$OUT/pretrain_llama.log" 2>&1 &
wait

# 2. A tokenizer.json for each export: GPT-2's byte-level BPE, vocabulary and merges from tiktoken's ranks.
python - "$OUT/mixtral-hf" "$OUT/llama-hf" <<'EOF'
import json, sys, tiktoken
ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks
bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
rest = [b for b in range(256) if b not in bs]  # GPT-2's bytes-to-characters table: these become chr(256 + i)
char = dict(zip([*bs, *rest], map(chr, [*bs, *range(256, 256 + len(rest))])))
text = lambda b: "".join(char[x] for x in b)
merges = sorted(((r, text(b[:i]), text(b[i:])) for b, r in ranks.items() if len(b) > 1 for i in range(1, len(b))
                 if ranks.get(b[:i], r) < r and ranks.get(b[i:], r) < r), key=lambda m: m[0])
tok = dict(version="1.0", added_tokens=[dict(id=50256, content="<|endoftext|>", special=True)],
           pre_tokenizer=dict(type="ByteLevel", add_prefix_space=False, use_regex=True),
           model=dict(type="BPE", vocab={**{text(b): r for b, r in ranks.items()}, "<|endoftext|>": 50256},
                      merges=[f"{a} {b}" for _, a, b in merges]))
for d in sys.argv[1:]:
    json.dump(tok, open(f"{d}/tokenizer.json", "w"))
EOF

# 3. Conversion and passkey fine-tuning with the memory: the table before and after, MoE against dense.
for base in mixtral llama; do
    [ -f "$OUT/infini-$base-hf/model.safetensors" ] || python infini_attention.py --init_from "$OUT/$base-hf" \
        --task passkey --device "$DEVICE" --max_iters "$ITERS" --out_dir "$OUT/infini-$base" \
        --export "$OUT/infini-$base-hf" > "$OUT/passkey_$base.log" 2>&1 &
done
wait

# 4. The gates: sigmoid(beta) per layer and head, the share of each head's output read from the memory; and, finer
# than the table's all-or-nothing accuracy, the key tokens' mean cross-entropy at each length, memory on and off.
python - "$OUT" "${PROBE_EXAMPLES:-10}" <<'EOF' | tee "$OUT/gates.log"
import sys, torch, torch.nn.functional as F, infini_attention as ia
out, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20
for base in ("mixtral", "llama"):
    model = ia.from_pretrained(f"{out}/infini-{base}-hf")
    print(f"{base}: sigmoid(gate) per layer, one number per head (the share of its output read from the memory)")
    for i, block in enumerate(model.model.layers):
        print(f"  layer {i}: " + " ".join(f"{g:.3f}" for g in torch.sigmoid(block.self_attn.gate).tolist()))
    encode, N = ia.hf_tokenizer(f"{out}/{base}-hf/tokenizer.json")[1], model.config.segment_len
    print(f"{base}: the key's tokens' mean cross-entropy (nats), {n} examples per length, memory / gated off")
    for segments in (1, 2, 4, 8, 16):
        losses = []
        for gate in (None, float("-inf")):
            saved = [b.self_attn.gate.clone() for b in model.model.layers]
            for b in model.model.layers if gate is not None else []:  # gated off: sigmoid(-inf) = 0
                b.self_attn.gate.data.fill_(gate)
            torch.manual_seed(segments * N)  # the accuracy table's examples (its first n)
            x, _, y = ia.passkey_batch(encode, n, segments * N, "cpu")
            k, state = int((y >= 0).sum(dim=1).max()), model.new_state()
            with torch.no_grad():
                for segment in x.split(N, dim=1):
                    h = model.hidden(segment, state)
                logits = model.lm_head(h[:, -k:])[..., :model.config.vocab_size]
            losses.append(F.cross_entropy(logits.flatten(0, 1), y[:, -k:].flatten(), ignore_index=-1).item())
            for b, s in zip(model.model.layers, saved):
                b.self_attn.gate.data.copy_(s)
        print(f"  {segments:>2} segments: {losses[0]:.3f} / {losses[1]:.3f}")
EOF
grep -h -A3 "passkey accuracy" "$OUT"/passkey_*.log
