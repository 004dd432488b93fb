"""See inside (issue 32): --show_routing (the MoE files: the experts each sampled token went to, recorded while
sampling) and --show_top K (every file: the K likeliest next tokens beside each sampled one), and the expert load
per layer at each eval in metrics.jsonl and, as a heatmap, in TensorBoard. Tiny random models, in-process."""
import importlib
import json
import re
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import jamba
import mixtral
import mla_moe
from conftest import needs_gpt2_bpe, randomize, script_home

ESC = "\x1b["


def tiny(script):
    """A random tiny MoE model of the script, vocab 256 (the bytes tokenizer), and its MoE layers as (index, module
    whose input the router sees, the router's top-k of that input)."""
    torch.manual_seed(0)
    if script == "mixtral":
        model = randomize(mixtral.Mixtral(mixtral.Config(vocab_size=256, block_size=64, n_layer=2, n_head=2,
                                                         n_kv_head=1, n_embd=32, n_expert=4)))
        moes = [(i, b.block_sparse_moe, lambda m, h: m.gate(h).topk(m.top_k).indices)
                for i, b in enumerate(model.model.layers)]
    elif script == "jamba":
        model = randomize(jamba.Jamba(jamba.Config(vocab_size=256, block_size=64, n_layer=4, n_head=2, n_kv_head=1,
                                                   n_embd=32, intermediate_size=48, n_expert=4, attn_layer_period=2,
                                                   attn_layer_offset=1, d_state=8)))
        moes = [(i, model.model.layers[i].feed_forward, lambda m, h: m.gate(h).softmax(-1).topk(m.top_k).indices)
                for i in model.moe_layers]
    else:  # V3's gate: sigmoid, 4 groups of 2 experts, a token's experts from 2 of them
        model = randomize(mla_moe.DeepSeek(mla_moe.Config(
            vocab_size=256, block_size=64, n_layer=3, n_head=2, n_embd=32, intermediate_size=48,
            moe_intermediate_size=16, n_expert=8, n_shared_experts=1, top_k_experts=2, n_group=4, topk_group=2,
            first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)))
        moes = [(i, b.mlp, lambda m, h: m.gate(h)[1]) for i, b in enumerate(model.model.layers) if b.moe]
    return model, moes


def args_of(module, *argv):
    return module.parse_args(["--max_new_tokens", "12", "--temperature", "0", *argv])[0]


def show(module, model, *argv):
    """module.show_sample of model with --show_routing and argv, the bytes tokenizer; the printed rows."""
    env = SimpleNamespace(dtype=torch.float32, ctx=nullcontext())
    module.show_sample(model, module.load_tokenizer("bytes"), args_of(module, "--show_routing", *argv), env, "sample")


def routing_rows(out):
    """The --show_routing rows: [{layer: [experts]}, ...], and each row's groups column (mla_moe) or None."""
    rows = []
    for line in out.split("--show_routing")[1].split("tokens per expert")[0].splitlines()[1:]:
        cols = line.split(" | ")[1:]
        rows.append(({int(c.split()[0][1:]): [int(x.split(":")[0]) for x in c.split()[1:]]
                      for c in cols if c.startswith("L")}, next((c for c in cols if c.startswith("groups")), None)))
    return rows


@pytest.mark.parametrize("script", ["mixtral", "mla_moe", "jamba"])
def test_routing_rows_are_the_routers_choice(script, capsys, monkeypatch):
    """Each row names the experts the router chose for that token, as the router itself chooses them on the same
    hidden states, which a plain forward over the whole text (no cache, nothing recorded) gives again; mla_moe's
    rows also name the groups, each holding chosen experts, and a header on its shared experts. After the sample
    no router records any more (the training forward never does)."""
    module = importlib.import_module(script)
    model, moes = tiny(script)
    monkeypatch.delenv("NO_COLOR", raising=False)
    capsys.readouterr()
    show(module, model, "--prompt", "Hi there")
    out = capsys.readouterr().out
    assert ESC not in out  # capsys is no terminal: plain text
    seq = model.generate(torch.tensor([list(b"Hi there")]), 12, temperature=0)[0]  # greedy: the same sample
    hidden = {}
    hooks = [m.register_forward_hook(lambda m, a, y, i=i: hidden.__setitem__(i, a[0])) for i, m, _ in moes]
    with torch.no_grad():
        model(seq[None, :-1])  # every token fed in: the prompt and the sample but its last token
    for h in hooks:
        h.remove()
    rows = routing_rows(out)
    assert len(rows) == len(seq) - 1 == 8 + 11
    for i, m, top_k in moes:
        with torch.no_grad():
            chosen = top_k(m, hidden[i][0]).tolist()  # (T, k)
        assert [sorted(r[0][i]) for r in rows] == [sorted(c) for c in chosen]
    assert len({tuple(r[0][moes[0][0]]) for r in rows}) > 1  # the routing varies: the check sees something
    if script == "mla_moe":
        assert "shared experts: 1 per MoE layer, always on" in out
        for experts, groups in rows:
            for i, g in re.findall(r"L(\d+) ([\d,]+)", groups):
                assert len(g.split(",")) == 2 and {e // 2 for e in experts[int(i)]} <= set(map(int, g.split(",")))
    assert all((m.gate if script == "mla_moe" else m).record is None for _, m, _ in moes)
    assert "tokens per expert and layer over these 19 tokens" in out and "the tokens each expert took most" in out


def test_colors_in_a_terminal_only(capsys, monkeypatch):
    """Escape codes when stdout is a terminal, each expert in its own color; none with NO_COLOR set; none when it is
    not a terminal (the rows test)."""
    model, _ = tiny("mixtral")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    capsys.readouterr()
    show(mixtral, model)
    colored = capsys.readouterr().out
    assert len(set(re.findall(r"\x1b\[38;5;(\d+)m", colored))) == 4  # 4 experts, 4 colors
    monkeypatch.setenv("NO_COLOR", "1")
    show(mixtral, model)
    plain = capsys.readouterr().out
    assert ESC not in plain and re.sub(r"\x1b\[[\d;]*m", "", colored) == plain


def top_rows(out):
    """The --show_top rows: [(sampled token text, [(token text, probability), ...])]."""
    rows = []
    for line in out.split("--show_top")[1].split("--show_routing")[0].splitlines()[1:]:
        token, top = line.strip().split(" | top: ")
        pairs = re.findall(r"('(?:[^'\\]|\\.)*'|\"[^\"]*\") (\S+?)(?:,|$)", top)  # 'text' .31, "it's" .02
        rows.append((token.strip(), [(t, float(p)) for t, p in pairs]))
    return rows


@pytest.mark.parametrize("script,temperature", [("mixtral", "0.7"), ("mamba", "0"), ("llama2", "1.3")])
def test_show_top_is_the_softmax_of_the_logits(script, temperature, capsys):
    """--show_top 3: beside each sampled token, the 3 likeliest of softmax(logits / temperature) (softmax(logits)
    when greedy), before top_k filtering (--top_k 2 here), as a forward over the whole text gives them: the same
    tokens in order, probabilities within rounding, summing to at most 1."""
    module = importlib.import_module(script)
    torch.manual_seed(0)
    flags = dict(mixtral=dict(n_kv_head=1, n_expert=4), mamba={}, llama2=dict(n_kv_head=1))[script]
    heads = {} if script == "mamba" else dict(n_head=2)
    model = randomize(getattr(module, dict(mixtral="Mixtral", mamba="Mamba", llama2="Llama")[script])(
        module.Config(vocab_size=256, block_size=64, n_layer=2, n_embd=32, **heads, **flags)), std=0.5)
    tokenizer = module.load_tokenizer("bytes")
    args = args_of(module, "--show_top", "3", "--top_k", "2", "--temperature", temperature, "--prompt", "ab")
    capsys.readouterr()
    out_ids = module.sample(model, tokenizer, args, nullcontext(), "sample")
    rows = top_rows(capsys.readouterr().out)
    assert len(rows) == 12 and len(out_ids) == 14
    with torch.no_grad():
        logits = model(torch.tensor([out_ids[:-1]]))[0][0, 1:]  # the 12 distributions the sample was drawn from
    probs = (logits / (float(temperature) or 1)).softmax(-1)
    top = probs.topk(3)
    assert top.values[:, 0].max() > 0.1  # peaked enough that 2 decimals say something
    for (token, likeliest), t, p, i in zip(rows, out_ids[2:], top.values.tolist(), top.indices.tolist()):
        assert token == repr(tokenizer[2]([t]))
        assert [text for text, _ in likeliest] == [repr(tokenizer[2]([j])) for j in i]
        assert [q for _, q in likeliest] == pytest.approx(p, abs=0.0051)
        assert sum(q for _, q in likeliest) <= 1.0 + 0.015
    if temperature == "0":  # greedy: each sampled token is the likeliest
        assert all(token == likeliest[0][0] for token, likeliest in rows)


def test_expert_load_heatmap(tmp_path):
    """log_metrics sends a layers x experts table (the load) to TensorBoard as a grey uint8 image, 8 x 8 pixels a
    cell, black at its least value, white at its greatest; numbers stay scalars, the table stays in metrics.jsonl."""
    logged = []
    writer = SimpleNamespace(add_image=lambda *a, **kw: logged.append((a, kw)), add_scalar=lambda *a: logged.append(a))
    load = [[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]]
    mixtral.log_metrics(dict(iter=7, val=2.5, expert_load=load), SimpleNamespace(out_dir=tmp_path, writer=writer))
    assert logged[0] == ("val", 2.5, 7)
    (tag, img, step), kw = logged[1]
    assert (tag, step, kw) == ("expert_load", 7, dict(dataformats="HW")) and len(logged) == 2
    assert img.dtype.name == "uint8" and img.shape == (16, 32)
    assert (img[:8, :8] == 255).all() and img[0, 31] == 0 and img[8, 8] == round(255 * 0.2 / 0.5)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["expert_load"] == load


def test_load_per_layer_at_eval_in_metrics_and_tensorboard(tmp_path, monkeypatch, capsys, offline):
    """A tiny mixtral.py run: each eval line of metrics.jsonl holds the expert load, a row per layer of each
    expert's share (summing to 1); --tensorboard gets it as an image (log_metrics, caught); then --init_from resume
    --sample_only --show_routing --show_top 2 shows both tables."""
    needs_gpt2_bpe()
    script_home(mixtral, tmp_path, monkeypatch)
    images = []
    real = mixtral.log_metrics

    class Writer:
        def add_scalar(self, *a):
            pass

        def add_image(self, tag, img, step, dataformats):
            images.append((tag, img.shape, img.dtype.name, step, dataformats))

        def close(self):
            pass

    def log_metrics(record, env):
        env.writer = Writer()
        real(record, env)
    monkeypatch.setattr(mixtral, "log_metrics", log_metrics)
    common = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_kv_head", "1", "--n_embd", "32",
              "--n_expert", "4", "--block_size", "16", "--batch_size", "2", "--eval_iters", "1",
              "--max_new_tokens", "4"]
    mixtral.main([*common, "--max_iters", "2", "--eval_interval", "1", "--log_interval", "1"])
    lines = (tmp_path / "out" / "mixtral" / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, lines) if "val" in r]
    assert [r["iter"] for r in evals] == [1, 2]
    for r in evals:
        assert len(r["expert_load"]) == 2
        assert all(len(row) == 4 and sum(row) == pytest.approx(1) for row in r["expert_load"])
    assert images == [("expert_load", (16, 32), "uint8", it, "HW") for it in (1, 2)]
    capsys.readouterr()
    mixtral.main([*common, "--init_from", "resume", "--sample_only", "--show_routing", "--show_top", "2"])
    out = capsys.readouterr().out
    assert "--show_top 2: each sampled token" in out and len(top_rows(out)) == 4
    assert len(routing_rows(out)) == 4  # the prompt "\n" and 3 of the 4 sampled tokens
