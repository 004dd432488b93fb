"""save_pretrained and --export: a model of ours written in its family's Hugging Face layout loads in transformers with
the same logits (within 1e-4), and back into ours with from_pretrained; lora.py's adapters load into peft."""
import importlib
import json

import pytest
import torch

from conftest import SCRIPTS, ids, max_diff, randomize, script_home

SMALL = dict(vocab_size=300, n_layer=2, n_embd=32)
HEADS = dict(SMALL, block_size=32, n_head=4, n_kv_head=2)
CONFIGS = {  # script: (its Config's fields, the transformers class of its family)
    "gpt2": (dict(SMALL, block_size=32, n_head=2), "GPT2LMHeadModel"),
    "llama2": (dict(HEADS, rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                                                     high_freq_factor=4.0, original_max_position_embeddings=16)),
               "LlamaForCausalLM"),
    "mixtral": (dict(HEADS, intermediate_size=48, n_expert=4, top_k_experts=2), "MixtralForCausalLM"),
    "mla_moe": (dict(SMALL, block_size=32, n_head=4, intermediate_size=48, moe_intermediate_size=16, n_expert=8,
                     n_shared_experts=1, top_k_experts=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                     q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
                "DeepseekV3ForCausalLM"),
    "mamba": (dict(SMALL, d_state=8), "MambaForCausalLM"),
    "bitnet": (dict(HEADS, tie_embeddings=True), "BitNetForCausalLM"),
    "infini_attention": (dict(SMALL, segment_len=32, n_head=4, n_kv_head=2), "LlamaForCausalLM"),  # one segment
    "mamba2": (dict(SMALL, d_state=8, headdim=16, ngroups=2, chunk_size=16), "Mamba2ForCausalLM"),
    "jamba": (dict(HEADS, intermediate_size=48, n_expert=4, attn_layer_period=2, attn_layer_offset=1, d_state=8),
              "JambaForCausalLM"),
}
MODEL_CLASS = {"gpt2": "GPT", "lora": "GPT", "llama2": "Llama", "mixtral": "Mixtral", "mla_moe": "DeepSeek",
               "mamba": "Mamba", "bitnet": "BitNet", "infini_attention": "InfiniTransformer", "jamba": "Jamba",
               "mamba2": "Mamba2"}


def ours(script, seed=0):
    m = importlib.import_module(script)
    torch.manual_seed(seed)
    model = randomize(getattr(m, MODEL_CLASS[script])(m.Config(**CONFIGS[script][0])))
    if script == "mla_moe":  # a routing bias of the checkpoint's, not zero
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return m, model


@pytest.mark.parametrize("script", [s for s in CONFIGS if s in SCRIPTS])
def test_transformers_loads_what_we_write(script, tmp_path):
    transformers = pytest.importorskip("transformers")
    m, model = ours(script)
    m.save_pretrained(model, tmp_path)
    hf = getattr(transformers, CONFIGS[script][1]).from_pretrained(tmp_path).eval()
    idx = ids(300, 2, 32, seed=1)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf(idx).logits[..., :300]) < 1e-4
        assert max_diff(model(idx)[0], m.from_pretrained(tmp_path)(idx)[0]) < 1e-6  # and back into ours
    assert set(json.loads((tmp_path / "config.json").read_text())) >= {"model_type", "vocab_size"}


@pytest.mark.skipif("lora" not in SCRIPTS, reason="no lora.py")
def test_lora_exports_the_merged_model_and_peft_adapters(tmp_path):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    import lora
    torch.manual_seed(0)
    base = randomize(lora.GPT(lora.Config(**CONFIGS["gpt2"][0])))
    lora.write_gpt2(base, tmp_path / "base")
    model = lora.add_lora(base, rank=4, alpha=8, targets=("c_attn", "c_fc"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)  # adapters that change the model
    lora.save_pretrained(model, tmp_path / "tuned")
    idx = ids(300, 2, 32, seed=1)
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "tuned").eval()
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        base_logits = hf_base(idx).logits  # before peft wraps hf_base in place
    with_adapters = peft.PeftModel.from_pretrained(hf_base, tmp_path / "tuned" / "adapter").eval()
    with torch.no_grad():
        mine = model.eval()(idx)[0]
        assert max_diff(mine, merged(idx).logits) < 1e-4 and max_diff(mine, with_adapters(idx).logits) < 1e-4
        assert max_diff(mine, base_logits) > 1e-2  # the adapters did change the model


@pytest.mark.parametrize("script, model_kw", [("bitnet", dict(weight_bits=1.0)),
                                              ("mla_moe", dict(scoring="softmax", norm_topk_prob=True))])
def test_what_has_no_layout_is_refused(script, model_kw, tmp_path):
    if script not in SCRIPTS:
        pytest.skip(f"no {script}.py")
    m = importlib.import_module(script)
    model = getattr(m, MODEL_CLASS[script])(m.Config(**{**CONFIGS[script][0], **model_kw}))
    with pytest.raises(m.InputError, match="--export"):
        m.save_pretrained(model, tmp_path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_export_flag(script, tmp_path, monkeypatch, offline, capsys):
    """--export DIR at the end of a run, and with --init_from resume --sample_only: from_pretrained reads it back."""
    m = importlib.import_module(script)
    monkeypatch.setattr(m, "CACHE_DIR", tmp_path / "cache")
    script_home(m, tmp_path, monkeypatch)
    heads = [] if script == "mamba" else ["--n_head", "2"]
    tiny = ["--device", "cpu", "--n_layer", "1", *heads, "--n_embd", "32", "--block_size", "16", "--batch_size", "2",
            "--eval_iters", "1", "--max_iters", "2", "--eval_interval", "2", "--max_new_tokens", "2"]
    m.main([*tiny, "--init_from", "scratch", "--export", "hf"])
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()
    m.main(["--init_from", "resume", "--sample_only", "--device", "cpu", "--export", "hf2"])
    assert (tmp_path / "hf2" / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()
    assert m.from_pretrained(tmp_path / "hf2") is not None
