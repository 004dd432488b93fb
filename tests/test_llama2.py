"""llama2.py at the model level: HF parity (MHA, GQA, MQA, tied, rope theta, llama3 and linear scaling), checkpoint
formats, the checkpoint's tokenizer, the GQA KV cache, rotary's properties, causality, training; and the command
line with a pretrained checkpoint (the common command-line tests are in test_scripts.py)."""
import hashlib
import json
import math

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import llama2
from conftest import (CORPUS, check_cached_equals_uncached, check_causal, check_greedy_matches_hf,
                      check_model_on_reference_attention, check_overfits, check_variant_refused, hf_logits, ids,
                      max_diff, randomize, scale_up, script_home, serve_hub, train_tokenizer)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)
# name: LlamaConfig arguments on top of BASE
HF_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "theta500k": dict(num_key_value_heads=2, rope_theta=500000.0),
    "llama3_scaling": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "linear_scaling": dict(num_key_value_heads=4, rope_scaling=dict(rope_type="linear", factor=4.0)),
    "head_dim_apart": dict(num_key_value_heads=2, head_dim=24),          # head_dim != hidden_size / heads
    "odd_vocab": dict(num_key_value_heads=2, vocab_size=1000, rms_norm_eps=1e-5),  # vocab padded to 1024
}
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def make_hf(seed=0, scale=3.0, **kw):
    """A random LlamaForCausalLM in eval mode: weights scaled up (logits of order 1), RMSNorm gains random too."""
    torch.manual_seed(seed)
    return scale_up(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **kw})), scale)


def tiny_llama(seed=0, vocab=300, block=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, **kw):
    """A random llama2.Llama in eval mode with weights large enough that greedy decoding wanders."""
    torch.manual_seed(seed)
    return randomize(llama2.Llama(llama2.Config(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head,
                                                n_kv_head=n_kv_head, n_embd=n_embd, **kw)))


# ------------------------------------------------------------------------------------ HF parity

@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_hf(case, tmp_path):
    hf = make_hf(seed=len(case), **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    model = llama2.from_pretrained(tmp_path)
    assert not model.training
    cfg, hc = model.config, hf.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.head_dim, cfg.vocab_size, cfg.block_size) == \
           (hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads, hc.hidden_size, hc.head_dim,
            hc.vocab_size, hc.max_position_embeddings)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (case == "tied")
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (cfg.n_kv_head * cfg.head_dim, cfg.n_embd)
    idx = ids(cfg.vocab_size, 2, 128)  # the whole context: far past original_max_position_embeddings = 64
    with torch.no_grad():
        logits, loss = model(idx)
    ref = hf_logits(hf, idx)
    assert loss is None and logits.shape == ref.shape
    assert ref.abs().max() > 1.0
    assert max_diff(logits, ref) < 1e-4


def test_llama3_rope_frequencies_match_hf():
    """Llama 3.1's own rope parameters (head_dim 128, theta 500000, factor 8 over 8192 positions): all three
    bands (kept, interpolated, stretched) are present, and the frequencies equal transformers' bit for bit."""
    scaling = dict(LLAMA3_SCALING, original_max_position_embeddings=8192)
    hc = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                                  rope_theta=500000.0, rope_scaling=scaling)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hc, "cpu")
    cfg = llama2.Config(n_embd=4096, n_head=32, n_kv_head=8, block_size=131072, rope_theta=500000.0,
                        rope_scaling=scaling)
    ours = llama2.rope_frequencies(cfg)
    assert torch.equal(ours, ref)
    plain = llama2.rope_frequencies(llama2.Config(n_embd=4096, n_head=32, n_kv_head=8, rope_theta=500000.0))
    ratio = plain / ours
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1.01) & (ratio < 7.99)).any()
    linear = llama2.Config(n_embd=64, n_head=4, n_kv_head=4, rope_scaling=dict(rope_type="linear", factor=4.0))
    assert torch.equal(llama2.rope_frequencies(linear) * 4, llama2.rope_frequencies(llama2.Config(n_embd=64, n_head=4, n_kv_head=4)))


def test_transformers4_config_format(tmp_path):
    """Hub Llama 3.1 files say rope_theta and rope_scaling {"rope_type" or "type": "llama3"} at the top level
    (transformers 4); transformers 5 writes rope_parameters. Both load the same model."""
    hf = make_hf(seed=3, **HF_CASES["llama3_scaling"])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type")}
    config.update(rope_theta=params["rope_theta"], rope_scaling=dict(scaling, type="llama3"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = llama2.from_pretrained(tmp_path)
    assert model.config.rope_theta == 500000.0 and model.config.rope_scaling["rope_type"] == "llama3"
    idx = ids(320, 2, 128)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4


def test_sharded_and_bf16_checkpoints(tmp_path):
    hf = make_hf(seed=4, **HF_CASES["gqa"])
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) >= 3
    idx = ids(320, 2, 64)
    with torch.no_grad():
        assert max_diff(llama2.from_pretrained(tmp_path / "sharded")(idx)[0], hf_logits(hf, idx)) < 1e-4
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    # the reference reads the bf16 file into float32 afresh (casting hf back would keep a bf16-rounded rotary table)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    stored = llama2.read_safetensors(tmp_path / "bf16" / "model.safetensors")
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    model = llama2.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4
    model16 = llama2.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    assert torch.equal(model16.model.layers[1].self_attn.v_proj.weight, stored["model.layers.1.self_attn.v_proj.weight"])
    with torch.no_grad():
        logits16 = model16(idx)[0]
    assert logits16.dtype == torch.bfloat16
    assert max_diff(logits16.float(), hf_logits(hf, idx)) < 0.1 * hf_logits(hf, idx).abs().max().item()


@pytest.mark.parametrize("case", ["gqa", "mqa"])
def test_greedy_generation_matches_hf(case, tmp_path):
    hf = make_hf(seed=7, scale=6.0, **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    check_greedy_matches_hf(llama2.from_pretrained(tmp_path), hf, 320, 24)


# ------------------------------------------------------------------------------ from_pretrained refusals

@pytest.mark.parametrize("change", [dict(model_type="mistral"), dict(hidden_act="gelu"), dict(attention_bias=True),
                                    dict(mlp_bias=True), dict(rope_parameters=dict(rope_type="yarn", factor=4.0))])
def test_variants_are_refused(tmp_path, change):
    check_variant_refused(llama2, make_hf(seed=0), tmp_path, change)


def test_bad_weights_are_refused(tmp_path):
    make_hf(seed=0).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(llama2.InputError, match="cannot read"):  # no weights
        llama2.from_pretrained(tmp_path)
    safetensors.torch.save_file({"model.embed_tokens.weight": torch.zeros(320, 64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(llama2.InputError, match="lacks"):
        llama2.from_pretrained(tmp_path)
    safetensors.torch.save_file({"model.embed_tokens.weight": torch.zeros(320, 32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(llama2.InputError, match="shape"):
        llama2.from_pretrained(tmp_path)
    with pytest.raises(llama2.InputError, match="not a checkpoint directory"):
        llama2.from_pretrained(tmp_path / "config.json")


@pytest.fixture
def server(http_server, monkeypatch, tmp_path):
    return serve_hub(llama2, http_server, monkeypatch, tmp_path / "cache")


@pytest.mark.parametrize("sharded", [False, True])
def test_from_pretrained_hub(server, sharded, tmp_path):
    hf = make_hf(seed=2, **HF_CASES["gqa"])
    repo = server.root / "someorg" / "tiny-llama" / "resolve" / "main"
    hf.save_pretrained(repo, max_shard_size="60KB" if sharded else "50GB")
    (repo / "tokenizer.json").write_text("{}")
    model = llama2.from_pretrained("someorg/tiny-llama")
    idx = ids(320, 2, 32)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4
    cached = llama2.CACHE_DIR / "someorg" / "tiny-llama"
    assert (cached / "tokenizer.json").exists() and not list(cached.glob("*.part"))
    assert len(list(cached.glob("model-*.safetensors"))) >= (3 if sharded else 0)
    with pytest.raises(llama2.InputError, match="cannot fetch"):
        llama2.from_pretrained("someorg/nothing-here")


# ------------------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("prompt_len, new_tokens", [(5, 12), (8, 40)])  # the second slides past block_size 32
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cached_generation_equals_uncached(prompt_len, new_tokens, n_kv_head):
    check_cached_equals_uncached(tiny_llama(seed=1, n_kv_head=n_kv_head), 300, prompt_len, new_tokens)


def test_cache_holds_kv_heads_only():
    """The cache stores n_kv_head heads, and kv_bytes_per_token is what its tensors take."""
    for n_kv_head in (4, 2, 1):
        model = tiny_llama(n_kv_head=n_kv_head)
        cache = [llama2.KVCache(20) for _ in model.model.layers]
        with torch.no_grad():
            model(ids(300, 3, 20), cache=cache, pos=0)
        assert cache[0].k.shape == cache[0].v.shape == (3, n_kv_head, 20, 16)
        measured = sum(c.k.nbytes + c.v.nbytes for c in cache) / (3 * 20)
        assert measured == model.kv_bytes_per_token(4) == 2 * 2 * n_kv_head * 16 * 4


def test_cached_forward_matches_full_forward():
    model = tiny_llama(seed=3)
    idx = ids(300, 2, 32, seed=4)
    cache = [llama2.KVCache(32) for _ in model.model.layers]
    with torch.no_grad():
        full = model(idx)[0]
        for a, b in [(0, 10), (10, 11), (11, 12), (12, 17), (17, 18), (18, 32)]:  # single tokens and chunks at pos > 0
            part = model(idx[:, a:b], cache=cache, pos=a)[0]
            assert part.shape == (2, b - a, 300)
            assert max_diff(part, full[:, a:b]) < 1e-5, (a, b)
        with pytest.raises(ValueError):
            model(idx[:, :1], cache=cache, pos=32)  # past block_size


# ------------------------------------------------------------------- attention, the paper's and fast

@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("T, pos", [(9, 0), (1, 7), (5, 7)])  # from 0, one token after a cache, a chunk
def test_attention_is_grouped_query_attention_as_written(n_kv_head, T, pos):
    """attention (SDPA, enable_gqa) = gqa_reference (the key/value heads copied to every query head of
    their group, then eq. 1 with the causal mask as written), float32; for MHA both are eq. 1 itself."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, T, 16)
    k, v = torch.randn(2, 2, n_kv_head, pos + T, 16).unbind(0)
    fast, ref = llama2.attention(q, k, v, pos), llama2.gqa_reference(q, k, v, pos)
    assert fast.shape == ref.shape == (2, 4, T, 16)
    assert max_diff(fast, ref) < 1e-5
    if n_kv_head == 4:
        assert torch.equal(ref, llama2.attention_reference(q, k, v, pos))


def test_the_model_on_the_reference_attention(monkeypatch):
    """The whole GQA model with gqa_reference in place of attention: the same logits, whole and by
    chunks after a KV cache, to 1e-5."""
    model = tiny_llama(seed=3)
    check_model_on_reference_attention(llama2, model, llama2.gqa_reference, model.model.layers, monkeypatch)


@pytest.mark.parametrize("tied", [False, True])
def test_optimizer_groups_by_name(tmp_path, tied):
    """optimizer_groups names every parameter; its groups are the old rule's (decay: a matrix; Muon: a
    decayed matrix but the embedding and head), for a fresh model, after from_pretrained, and after
    load_state_dict(assign=True), which drops a tensor's attributes (why the groups go by name)."""
    def old_rule(model):
        tables = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
        return {name: "muon" if p.dim() == 2 and id(p) not in tables else "decay" if p.dim() >= 2 else "no_decay"
                for name, p in model.named_parameters()}
    model = tiny_llama(tie_embeddings=tied)
    groups = model.optimizer_groups()
    assert groups == old_rule(model) and set(groups) == {name for name, _ in model.named_parameters()}
    assert groups["model.layers.1.self_attn.k_proj.weight"] == "muon" and groups["model.norm.weight"] == "no_decay"
    assert ("lm_head.weight" in groups) != tied
    llama2.save_pretrained(model, tmp_path)
    assert llama2.from_pretrained(tmp_path).optimizer_groups() == groups
    if not tied:
        loaded = llama2.Llama(model.config)
        loaded.load_state_dict(model.state_dict(), assign=True)
        assert loaded.optimizer_groups() == groups


# ------------------------------------------------------------------------------------- rotary

def test_rotary_is_relative_and_equals_the_complex_form():
    """RoFormer: q_m . k_n depends only on m - n. And the paper's complex form on adjacent pairs (Meta's code)
    equals our rotate-half form once the rows of W_q and W_k are permuted as HF's conversion does."""
    cfg = llama2.Config(n_embd=64, n_head=4, n_kv_head=4, block_size=64)
    d = cfg.head_dim
    angles = torch.arange(64, dtype=torch.float32)[:, None] * llama2.rope_frequencies(cfg)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)
    rq = llama2.apply_rotary(q.expand(1, 1, 64, d), cos, sin)[0, 0]  # q at every position 0..63
    rk = llama2.apply_rotary(k.expand(1, 1, 64, d), cos, sin)[0, 0]
    for m, n in [(5, 2), (40, 37), (63, 60)]:  # the same offset, 3
        assert (rq[m] @ rk[n]).item() == pytest.approx((rq[3] @ rk[0]).item(), abs=1e-4)
    assert abs((rq[10] @ rk[0]) - (rq[3] @ rk[0])) > 1e-3

    # Meta's form: x as d/2 complex numbers (x_0 + i x_1, x_2 + i x_3, ...) times e^{i m theta_j}
    inv_freq = llama2.rope_frequencies(cfg)
    perm = torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))  # HF's row order: evens, then odds
    x_meta = torch.randn(d, generator=g)
    for m in (0, 1, 17, 63):
        z = torch.view_as_complex(x_meta.view(d // 2, 2)) * torch.polar(torch.ones(d // 2), m * inv_freq)
        meta = torch.view_as_real(z).flatten()
        ours = llama2.apply_rotary(x_meta[perm].view(1, 1, 1, d), cos[m:m + 1], sin[m:m + 1]).flatten()
        assert torch.allclose(ours, meta[perm], atol=1e-5)


# ------------------------------------------------------------------------------------- causality, training

@pytest.mark.parametrize("t", [1, 7, 20, 31])
def test_causality(t):
    model = tiny_llama(seed=5)
    check_causal(model, 300, t)


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = llama2.Llama(llama2.Config(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    check_overfits(model, 100)


def test_config_and_init():
    cfg = llama2.Config(vocab_size=50257, n_embd=384, n_head=6, n_kv_head=2)
    assert (cfg.padded_vocab_size, cfg.head_dim, cfg.intermediate_size) == (50304, 64, 1024)
    assert llama2.Config(n_embd=128, n_head=4, n_kv_head=2).intermediate_size == 384  # 8/3 * 128 = 341.3 -> 384
    for bad in (dict(n_head=4, n_kv_head=3), dict(n_kv_head=0), dict(n_embd=60, n_head=4, n_kv_head=4),
                dict(rope_scaling=dict(rope_type="dynamic", factor=2.0))):
        with pytest.raises(llama2.InputError):
            llama2.Config(**{**dict(n_embd=64, n_head=4, n_kv_head=4), **bad})
    torch.manual_seed(0)
    n_layer = 4
    model = llama2.Llama(llama2.Config(vocab_size=1000, block_size=64, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=256))
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied by default
    assert model.model.embed_tokens.weight.shape == model.lm_head.weight.shape == (1024, 256)
    residual = 0.02 / math.sqrt(2 * n_layer)
    blk = model.model.layers[2]
    for w, std in ((blk.self_attn.q_proj.weight, 0.02), (blk.mlp.gate_proj.weight, 0.02),
                   (blk.self_attn.o_proj.weight, residual), (blk.mlp.down_proj.weight, residual),
                   (model.lm_head.weight, 0.02)):
        assert w.std().item() == pytest.approx(std, rel=0.05)
    assert torch.equal(blk.input_layernorm.weight, torch.ones(256))
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    x, y = ids(1000, 2, 16), ids(1000, 2, 16, seed=2)  # padding columns get no probability and no gradient
    logits, loss = model(x, y)
    assert logits.shape == (2, 16, 1000)
    loss.backward()
    assert not model.lm_head.weight.grad[1000:].any() and model.lm_head.weight.grad[:1000].abs().sum() > 0


# ------------------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("style", ["llama3", "gpt2"])
def test_tokenizer_json_matches_tokenizers(tmp_path, style):
    ref = train_tokenizer(tmp_path / "tokenizer.json", style)
    name, encode, decode, n_vocab = llama2.hf_tokenizer(tmp_path / "tokenizer.json")
    assert name == str(tmp_path / "tokenizer.json") and n_vocab == ref.get_vocab_size() == 600
    text = CORPUS[-20_000:] + "\nnaïve café 12345 ünïcödé — 🙂\r\n\tdon't  WE'LL"  # unseen text too
    ours = encode(text)
    assert ours == ref.encode(text).ids and len(ours) < 0.6 * len(text.encode())
    assert decode(ours) == text
    assert decode([0] + ours[:5] + [10**6]) == "<|begin_of_text|>" + decode(ours[:5])  # specials kept, unknown dropped


def test_tokenizers_of_other_kinds_give_none_damaged_ones_are_bad_input(tmp_path):
    assert llama2.hf_tokenizer(tmp_path / "missing.json") is None
    (tmp_path / "t.json").write_text("not json")
    with pytest.raises(llama2.InputError, match="tokenizer.json is damaged"):
        llama2.hf_tokenizer(tmp_path / "t.json")
    no_decoder = {"model": {"type": "BPE", "vocab": {"▁a": 0}, "merges": []}, "normalizer": None,
                  "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}  # SentencePiece style, no decoder
    (tmp_path / "t.json").write_text(json.dumps(no_decoder))
    assert llama2.hf_tokenizer(tmp_path / "t.json") is None
    train_tokenizer(tmp_path / "n.json", "gpt2", normalizer="Lowercase")
    assert llama2.hf_tokenizer(tmp_path / "n.json") is None


# ------------------------------------------------------------------------------------- command line

@pytest.fixture
def pretrained(tmp_path, monkeypatch, offline):
    """A Llama checkpoint with a tokenizer.json of 600 tokens, and the script's data/ and out/ under tmp_path."""
    script_home(llama2, tmp_path, monkeypatch)
    ckpt = tmp_path / "tiny-llama3"
    make_hf(seed=9, scale=1.0, vocab_size=600, bos_token_id=0, rope_theta=500000.0, num_key_value_heads=2).save_pretrained(ckpt)
    train_tokenizer(ckpt / "tokenizer.json")
    return ckpt


def test_cli_samples_and_finetunes_a_pretrained_checkpoint(pretrained, capsys):
    sample = ["--device", "cpu", "--sample_only", "--prompt", "ROMEO:", "--max_new_tokens", "6", "--temperature", "0"]
    llama2.main(["--init_from", str(pretrained), *sample])
    out = capsys.readouterr().out
    assert "kv cache: 512 bytes/token" in out and "all 4 heads, as MHA does, would take 1,024" in out
    text = out.split(f"--- sample from {pretrained} ---\n")[1].split("\n---")[0]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:") and "<|begin_of_text|>" not in text

    train = ["--device", "cpu", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--batch_size", "2",
             "--block_size", "32", "--max_new_tokens", "4"]
    llama2.main(["--init_from", str(pretrained), *train])
    out = capsys.readouterr().out
    assert f"tokenizer {pretrained / 'tokenizer.json'}" in out.splitlines()[0] and "done | 2 iters" in out
    meta = json.loads((pretrained.parent / "data" / "shakespeare" / "meta.json").read_text())
    tokenizer_sha1 = hashlib.sha1((pretrained / "tokenizer.json").read_bytes()).hexdigest()  # keyed by its content
    assert meta["tokenizer"] == tokenizer_sha1 and meta["vocab_size"] == 600
    llama2.main(["--init_from", "resume", "--max_iters", "4"])  # the resumed run finds the same tokenizer
    assert "done | 4 iters" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # a shape flag that contradicts the checkpoint
        llama2.main(["--init_from", str(pretrained), "--n_kv_head", "4", *train])
    assert e.value.code == 2 and "does not match" in capsys.readouterr().err


def test_cli_without_a_readable_tokenizer(pretrained, capsys):
    (pretrained / "tokenizer.json").unlink()
    llama2.main(["--init_from", str(pretrained), "--device", "cpu", "--sample_only", "--max_new_tokens", "5"])
    out = capsys.readouterr().out
    assert "shown as token ids" in out and "tokenizer none (token ids)" in out.splitlines()[0]
    sample = out.split("---\n")[1].split("\n---")[0]
    assert json.loads(sample)[0] == 0 and len(json.loads(sample)) == 6  # bos, then 5 ids
    with pytest.raises(SystemExit) as e:
        llama2.main(["--init_from", str(pretrained), "--device", "cpu", "--max_iters", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot be trained on text" in err and len(err.strip().splitlines()) == 1


def test_large_vocabularies_are_stored_as_uint32(tmp_path, monkeypatch):
    monkeypatch.setattr(llama2, "HERE", tmp_path)
    (tmp_path / "t.txt").write_text("abcdefghij" * 100)
    big = llama2.Tokenizer("big", lambda s: [70000 + ord(c) for c in s], None, 128256)  # ids past uint16 (Llama 3)
    files = llama2.prepare_data(str(tmp_path / "t.txt"), big)
    assert files["train"][0].dtype == np.uint32 and (tmp_path / "data" / "t" / "train.bin").stat().st_size == 1024 + 4 * 900
    torch.manual_seed(0)
    x, y = llama2.get_batch(files["train"], 4, 8, torch.device("cpu"))
    assert x.min() >= 70000 + ord("a") and x.max() <= 70000 + ord("j") and torch.equal(x[:, 1:], y[:, :-1])


def test_cli_architecture_flags(tmp_path, monkeypatch, offline, capsys):
    """--n_kv_head, --tie_embeddings, --rope_theta and --intermediate_size reach the model and its checkpoint,
    and a resume that contradicts them is refused."""
    script_home(llama2, tmp_path, monkeypatch)
    llama2.main(["--device", "cpu", "--n_layer", "1", "--n_head", "4", "--n_kv_head", "1", "--n_embd", "32",
                 "--intermediate_size", "48", "--tie_embeddings", "--rope_theta", "500000", "--block_size", "16",
                 "--batch_size", "2", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1",
                 "--max_new_tokens", "2"])
    assert "kv cache: 64 bytes/token" in capsys.readouterr().out  # 2 x 1 layer x 1 kv head x 8 x 4 bytes
    ckpt = torch.load(tmp_path / "out" / "llama2" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert {k: ckpt["config"][k] for k in ("n_kv_head", "intermediate_size", "tie_embeddings", "rope_theta")} == \
           dict(n_kv_head=1, intermediate_size=48, tie_embeddings=True, rope_theta=500000.0)
    assert "lm_head.weight" in ckpt["model"] and ckpt["model"]["model.layers.0.self_attn.k_proj.weight"].shape == (8, 32)
    for flag in (["--no-tie_embeddings"], ["--n_kv_head", "2"], ["--rope_theta", "10000"]):
        with pytest.raises(SystemExit) as e:
            llama2.main(["--init_from", "resume", *flag])
        assert e.value.code == 2 and "does not match" in capsys.readouterr().err
