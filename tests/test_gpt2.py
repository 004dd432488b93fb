"""gpt2.py at the model level: HF parity, checkpoints, hub downloads, KV cache, causality, training, init."""
import json
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers

import gpt2
from conftest import (check_cached_equals_uncached, check_causal, check_greedy_matches_hf,
                      check_model_on_reference_attention, check_overfits, hf_logits, ids, max_diff, serve_hub)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread")

# (n_layer, n_head, n_embd, vocab_size, n_positions, layer_norm_epsilon, activation_function)
HF_CONFIGS = [
    (1, 2, 32, 1000, 32, 1e-5, "gelu_new"),          # vocab not a multiple of 64
    (2, 4, 64, 512, 64, 1e-6, "gelu_pytorch_tanh"),  # vocab a multiple of 64
    (3, 3, 48, 333, 48, 1e-3, "gelu_new"),           # odd sizes, a large epsilon
]


def make_hf(n_layer, n_head, n_embd, vocab, n_pos, eps=1e-5, act="gelu_new", seed=0, scale=1.0):
    """A random HF GPT-2 in eval mode, every weight random (biases and LayerNorms too, not just the init)."""
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=n_pos,
                                  layer_norm_epsilon=eps, activation_function=act, bos_token_id=None,
                                  eos_token_id=None)
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05 * scale)
            elif ".ln_" in name:
                p.normal_(1.0, 0.1)
            else:
                p.mul_(scale)
    return hf.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """[(config, hf model, save_pretrained dir)] for HF_CONFIGS."""
    out = []
    for i, c in enumerate(HF_CONFIGS):
        hf = make_hf(*c, seed=i, scale=4.0)  # logits of order 1, not 0.1
        d = tmp_path_factory.mktemp(f"hf{i}")
        hf.save_pretrained(d)
        out.append((c, hf, d))
    return out


@pytest.fixture(scope="module")
def small_hf():
    """A 2-layer HF model with weights large enough that greedy decoding does not collapse to one token."""
    return make_hf(2, 4, 64, 300, 48, seed=7, scale=8.0)


def tiny_gpt(seed=0, vocab=300, block=32, n_layer=2, n_head=4, n_embd=64):
    """A random gpt2.GPT in eval mode, its weights larger than the init's so that greedy decoding wanders
    (at init it repeats one token) and the top two logits are far apart (no argmax near-ties)."""
    torch.manual_seed(seed)
    model = gpt2.GPT(gpt2.Config(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" not in name:
                p.normal_(0.0, 0.1 if "wte" in name else 0.2)
    return model.eval()


# ------------------------------------------------------------------------------------ HF parity

@pytest.mark.parametrize("i", range(len(HF_CONFIGS)))
def test_logits_match_hf(hf_dirs, i):
    (n_layer, n_head, n_embd, vocab, n_pos, eps, act), hf, d = hf_dirs[i]
    model = gpt2.from_pretrained(str(d))
    assert not model.training
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.layer_norm_epsilon) == \
           (n_layer, n_head, n_embd, vocab, n_pos, eps)
    idx = ids(vocab, 2, n_pos)
    with torch.no_grad():
        logits, loss = model(idx)
    assert loss is None and logits.shape == (2, n_pos, vocab)
    assert max_diff(logits, hf_logits(hf, idx)) < 1e-4
    # the padding rows of the embedding are zeros, the real rows are HF's
    wte = model.transformer.wte.weight
    assert wte.shape[0] == cfg.padded_vocab_size
    assert torch.equal(wte[:vocab], hf.transformer.wte.weight)
    assert not wte[vocab:].any()


def test_sharded_checkpoint(hf_dirs, tmp_path):
    (*_, vocab, n_pos, _, _), hf, _ = hf_dirs[1]
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    idx = ids(vocab, 2, n_pos)
    with torch.no_grad():
        logits = gpt2.from_pretrained(str(tmp_path))(idx)[0]
    assert max_diff(logits, hf_logits(hf, idx)) < 1e-4


def test_bf16_checkpoint(tmp_path):
    hf = make_hf(2, 4, 64, 500, 32, seed=3, scale=4.0)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    hf.to(torch.float32)  # now holds the bf16-rounded weights in float32
    stored = gpt2.read_safetensors(tmp_path / "model.safetensors")
    assert stored["transformer.wte.weight"].dtype == torch.bfloat16
    idx = ids(500, 2, 32)
    model = gpt2.from_pretrained(str(tmp_path))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4
    model16 = gpt2.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    assert torch.equal(model16.transformer.wte.weight[:500], stored["transformer.wte.weight"])
    assert torch.equal(model16.transformer.h[0].mlp.c_fc.weight, stored["transformer.h.0.mlp.c_fc.weight"].t())
    assert model16.lm_head.weight is model16.transformer.wte.weight
    with torch.no_grad():  # a bf16 model runs in bf16 without autocast, and stays close to the fp32 logits
        logits16, loss16 = model16(idx, idx)
        assert logits16.dtype == torch.bfloat16 and torch.isfinite(loss16)
        assert max_diff(logits16.float(), hf_logits(hf, idx)) < 0.1 * hf_logits(hf, idx).abs().max().item()


def test_greedy_generation_matches_hf(small_hf, tmp_path):
    small_hf.save_pretrained(tmp_path)
    check_greedy_matches_hf(gpt2.from_pretrained(str(tmp_path)), small_hf, 300, 20, pad_token_id=0)


# ------------------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("prompt_len, new_tokens", [(5, 12), (8, 40)])  # the second slides past block_size 32
def test_cached_generation_equals_uncached(prompt_len, new_tokens):
    check_cached_equals_uncached(tiny_gpt(seed=1), 300, prompt_len, new_tokens)


def test_cached_forward_matches_full_forward():
    model = tiny_gpt(seed=3)
    idx = ids(300, 2, 32, seed=4)
    cache = [gpt2.KVCache(32) for _ in model.transformer.h]  # block_size 32
    with torch.no_grad():
        full = model(idx)[0]
        chunks = [(0, 10), (10, 11), (11, 12), (12, 17), (17, 18), (18, 32)]  # single tokens and chunks at pos > 0
        for a, b in chunks:
            part = model(idx[:, a:b], cache=cache, pos=a)[0]
            assert part.shape == (2, b - a, 300)
            assert max_diff(part, full[:, a:b]) < 1e-5, (a, b)
        with pytest.raises(ValueError):
            model(idx[:, :1], cache=cache, pos=32)  # past block_size


# ------------------------------------------------------------------- attention, the paper's and fast

@pytest.mark.parametrize("T, pos", [(9, 0), (1, 0), (1, 7), (5, 7)])  # from 0, one token, a chunk
def test_attention_is_the_papers_equation(T, pos):
    """attention (scaled_dot_product_attention) = attention_reference, eq. 1 with the causal mask as
    written, from position 0 and after pos cached keys, float32."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, T, 16)
    k, v = torch.randn(2, 2, 3, pos + T, 16).unbind(0)
    fast, ref = gpt2.attention(q, k, v, pos), gpt2.attention_reference(q, k, v, pos)
    assert fast.shape == ref.shape == (2, 3, T, 16)
    assert max_diff(fast, ref) < 1e-5


def test_the_model_on_the_reference_attention(monkeypatch):
    """The whole model with attention_reference in place of attention: the same logits, whole and by
    chunks after a KV cache, to 1e-5."""
    model = tiny_gpt(seed=3)
    check_model_on_reference_attention(gpt2, model, gpt2.attention_reference, model.transformer.h, monkeypatch)


def test_optimizer_groups_by_name(tmp_path):
    """optimizer_groups names every parameter; its groups are the old rule's (decay: a matrix; Muon: a
    decayed matrix but the embeddings and head), for a fresh model and for one loaded with assign=True
    (which drops a tensor's attributes: why the groups go by name)."""
    def old_rule(model):
        tables = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
        return {name: "muon" if p.dim() == 2 and id(p) not in tables else "decay" if p.dim() >= 2 else "no_decay"
                for name, p in model.named_parameters()}
    model = tiny_gpt()
    groups = model.optimizer_groups()
    assert groups == old_rule(model)
    assert groups["transformer.wpe.weight"] == "decay" and groups["transformer.h.1.ln_2.bias"] == "no_decay"
    assert groups["transformer.h.0.attn.c_attn.weight"] == "muon"
    gpt2.save_pretrained(model, tmp_path)
    assert gpt2.from_pretrained(tmp_path).optimizer_groups() == groups
    loaded = gpt2.GPT(model.config)
    loaded.load_state_dict(model.state_dict(), assign=True)  # the head untied: a second "decay" table
    assert loaded.optimizer_groups() == dict(groups, **{"lm_head.weight": "decay"})


@pytest.mark.parametrize("t", [1, 7, 20, 31])
def test_causality(t):
    model = tiny_gpt(seed=5)
    check_causal(model, 300, t)


# --------------------------------------------------------------------------- training, padding, init

def test_overfit_one_batch():
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.Config(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=32))
    check_overfits(model, 100)


def test_vocab_padding():
    assert gpt2.Config(vocab_size=1000).padded_vocab_size == 1024
    assert gpt2.Config(vocab_size=50257).padded_vocab_size == 50304
    assert gpt2.Config(vocab_size=64).padded_vocab_size == 64
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.Config(vocab_size=1000, block_size=16, n_layer=1, n_head=2, n_embd=32))
    assert model.transformer.wte.weight.shape == (1024, 32)
    assert model.lm_head.weight is model.transformer.wte.weight
    x, y = ids(1000, 3, 16, seed=1), ids(1000, 3, 16, seed=2)
    y[0, 3] = -1  # ignored
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, 1000)
    ref = F.cross_entropy(logits.reshape(-1, 1000), y.reshape(-1), ignore_index=-1)
    assert abs(loss.item() - ref.item()) < 1e-5
    loss.backward()  # no gradient reaches the padding rows
    grad = model.transformer.wte.weight.grad
    assert not grad[1000:].any() and grad[:1000].abs().sum() > 0


def test_init_statistics():
    torch.manual_seed(0)
    n_layer = 4
    model = gpt2.GPT(gpt2.Config(vocab_size=512, block_size=64, n_layer=n_layer, n_head=4, n_embd=256))
    residual = 0.02 / math.sqrt(2 * n_layer)
    for i in range(n_layer):
        blk = model.transformer.h[i]
        for w, std in ((blk.mlp.c_fc.weight, 0.02), (blk.attn.c_attn.weight, 0.02),
                       (blk.mlp.c_proj.weight, residual), (blk.attn.c_proj.weight, residual)):
            assert w.std().item() == pytest.approx(std, rel=0.05)
            assert abs(w.mean().item()) < 0.1 * std
        for lin in (blk.mlp.c_fc, blk.mlp.c_proj, blk.attn.c_attn, blk.attn.c_proj):
            assert not lin.bias.any()
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)


# ------------------------------------------------------------------------------ from_pretrained errors

@pytest.mark.parametrize("change", [dict(model_type="llama"), dict(activation_function="relu"), dict(n_inner=100),
                                    None])
def test_from_pretrained_bad_dirs(hf_dirs, tmp_path, change):
    _, _, d = hf_dirs[0]
    (tmp_path / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    if change is not None:  # None: no config.json at all
        config = json.loads((d / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(gpt2.InputError):
        gpt2.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("variant", [
    dict(reorder_and_upcast_attn=True),  # numerics only: loads and matches
    dict(n_inner=256),                   # 4 * n_embd spelled out: loads and matches
    dict(tie_word_embeddings=False),     # an untied head: refused
    dict(scale_attn_weights=False),      # unscaled attention: refused
])
def test_from_pretrained_variant_loads_exactly_or_is_refused(tmp_path, variant):
    """A GPT2Config variant either gives HF's logits or raises InputError; never silently different logits."""
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=32, bos_token_id=None,
                                  eos_token_id=None, **variant)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    try:
        model = gpt2.from_pretrained(str(tmp_path))
    except gpt2.InputError:
        return
    idx = ids(300, 2, 32)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4


def test_from_pretrained_bad_weights(hf_dirs, tmp_path):
    _, _, d = hf_dirs[0]
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(gpt2.InputError):  # no weights
        gpt2.from_pretrained(str(tmp_path))
    safetensors.torch.save_file({"transformer.wte.weight": torch.zeros(1000, 32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(gpt2.InputError):  # missing tensors
        gpt2.from_pretrained(str(tmp_path))
    with pytest.raises(gpt2.InputError):  # a file, not a directory
        gpt2.from_pretrained(str(tmp_path / "config.json"))


# ------------------------------------------------------------------------------------- downloads

@pytest.fixture
def server(http_server, monkeypatch, tmp_path):
    return serve_hub(gpt2, http_server, monkeypatch, tmp_path / "cache")


@pytest.mark.parametrize("sharded", [False, True])
def test_from_pretrained_hub(server, hf_dirs, sharded):
    (*_, vocab, n_pos, _, _), hf, _ = hf_dirs[1]
    repo = server.root / "someorg" / "tiny-gpt2" / "resolve" / "main"
    hf.save_pretrained(repo, max_shard_size="60KB" if sharded else "50GB")
    assert (repo / "model.safetensors.index.json").exists() == sharded
    model = gpt2.from_pretrained("someorg/tiny-gpt2")
    idx = ids(vocab, 2, n_pos)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4
    cached = gpt2.CACHE_DIR / "someorg" / "tiny-gpt2"
    assert (cached / "config.json").exists() and not list(cached.glob("*.part"))
    if sharded:
        assert "someorg/tiny-gpt2/resolve/main/model.safetensors" in server.requests  # tried first: a 404
        assert len(list(cached.glob("model-*.safetensors"))) >= 3
    n = len(server.requests)
    gpt2.from_pretrained("someorg/tiny-gpt2")  # all cached: nothing is fetched again (a 404 may be asked again)
    assert set(server.requests[n:]) <= ({"someorg/tiny-gpt2/resolve/main/model.safetensors"} if sharded else set())


def test_from_pretrained_unknown_hub_id(server):
    with pytest.raises(gpt2.InputError):
        gpt2.from_pretrained("someorg/nothing-here")


