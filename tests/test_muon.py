"""--optimizer muon: which parameters Muon takes and which stay on AdamW, one schedule for both, both states in the
checkpoint and an exact resume, gradient accumulation and DDP, and the one-line refusals (a torch without Muon, a
resume that would switch optimizer)."""
import importlib

import pytest
import torch
from torch import nn

from conftest import SCRIPTS, copy_script, needs_gpt2_bpe, offline_env, run_script
from test_scripts import expect_exit, run_in, state, tiny

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")


def built(script, argv=()):
    """(module, args, model) as a run builds them from tiny(script) + argv, on the CPU preset."""
    m = importlib.import_module(script)
    args, given = m.parse_args([*tiny(script), *argv])
    for k, v in m.PRESETS["cpu"].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    model, _, _ = m.build_model(args, given, None, m.setup_device(args))
    return m, args, model


@pytest.mark.parametrize("script", SCRIPTS)
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(script, offline, monkeypatch, tmp_path):
    """Every trainable parameter in exactly one optimizer; Muon: the parameters the model's optimizer_groups names
    "muon", each a 2-D matrix inside the blocks (no embedding, no output head, no vector, nothing 3-D), and only
    AdamW's "no_decay" group without weight decay: mamba's A_log, Transformer-XL's u and v, norms, biases. The
    groups go by name, so a model loaded with load_state_dict(assign=True), as from_pretrained loads, keeps them
    (attributes on the old Parameters did not: Transformer-XL's u and v went to Muon, mamba's A_log decayed)."""
    monkeypatch.chdir(tmp_path)
    m, args, model = built(script, ["--optimizer", "muon"])
    params, new = dict(model.named_parameters(remove_duplicate=False)), {}  # new Parameters, a tied pair kept tied
    model.load_state_dict({k: new.setdefault(id(params[k]), nn.Parameter(v.clone(), params[k].requires_grad))
                           if k in params else v.clone() for k, v in model.state_dict().items()}, assign=True)
    optimizers = m.configure_optimizer(model, args, torch.device("cpu"))
    kinds = [torch.optim.Muon] if script == "lora" else [torch.optim.AdamW, torch.optim.Muon]  # adapters: matrices
    assert [type(o) for o in optimizers] == kinds
    name = {id(p): n for n, p in model.named_parameters()}
    on = {k: [name[id(p)] for o in optimizers if type(o) is k for g in o.param_groups for p in g["params"]]
          for k in (torch.optim.AdamW, torch.optim.Muon)}
    adamw, muon = torch.optim.AdamW, torch.optim.Muon
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(on[adamw] + on[muon]) == trainable  # each once, frozen ones (lora.py's base) in neither
    groups, params = model.optimizer_groups(), dict(model.named_parameters())
    assert set(groups) == set(params) and set(groups.values()) <= {"muon", "decay", "no_decay"}
    assert set(on[muon]) == {n for n in trainable if groups[n] == "muon"} and on[muon]
    tables = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)} | {id(model.lm_head.weight)}
    assert all(params[n].dim() == 2 and id(params[n]) not in tables for n in on[muon])
    undecayed = {name[id(p)] for o in optimizers for g in o.param_groups for p in g["params"] if not g["decay"]}
    assert undecayed == {n for n in trainable if groups[n] == "no_decay"}
    assert all(params[n].dim() == 1 for n in undecayed if not n.endswith(("A_log", ".u", ".v")))
    if script in ("mamba", "jamba"):
        assert any(n.endswith("A_log") for n in undecayed)
    if script == "transformer_xl":
        assert {n.rsplit(".", 1)[1] for n in undecayed if n.endswith((".u", ".v"))} == {"u", "v"}
    if script in ("mixtral", "mla_moe"):
        assert any(params[n].dim() == 3 for n in on[adamw])  # the experts' stacked weights
    if script == "lora":
        assert all(".lora_A." in n or ".lora_B." in n for n in on[muon])
    args.optimizer = "adamw"
    assert [type(o) for o in m.configure_optimizer(model, args, torch.device("cpu"))] == [torch.optim.AdamW]


# The optimizer code is one text in every file (test_harness.py); these differ in what it meets: a tied head, stacked
# experts, an undecayed matrix (mamba's A_log), Muon alone (lora.py's adapters), lr_scales (infini's gates).
RESUMED = [s for s in ("gpt2", "mixtral", "mamba", "lora", "infini_attention") if s in SCRIPTS]


@pytest.mark.parametrize("script", RESUMED)
def test_muon_resumes_exactly_under_one_schedule(script, tmp_path, monkeypatch, capsys, offline):
    """8 iterations with --optimizer muon, against 4 and a resume that does not retype --optimizer (the
    checkpoint's is kept) for 4 more: the same weights; the checkpoint holds both optimizers' states, and each
    group's learning rate is the schedule's (times its lr_scale)."""
    needs_gpt2_bpe()
    m = importlib.import_module(script)
    common = [*tiny(script), "--eval_interval", "4", "--warmup_iters", "2", "--lr_decay_iters", "8"]
    run_in(m, tmp_path / "straight", [*common, "--optimizer", "muon", "--max_iters", "8"], monkeypatch, capsys)
    run_in(m, tmp_path / "split", [*common, "--optimizer", "muon", "--max_iters", "4"], monkeypatch, capsys)
    out = run_in(m, tmp_path / "split", [*common, "--init_from", "resume", "--max_iters", "8"], monkeypatch, capsys)
    assert "iter 6 | loss" in out and "iter 2 | loss" not in out
    a, b = (state(tmp_path / run / "out" / script / "ckpt.pt") for run in ("straight", "split"))
    assert a["args"]["optimizer"] == b["args"]["optimizer"] == "muon" and len(b["optimizer"]) == 1 + (script != "lora")
    assert all(s["state"] for s in b["optimizer"])  # both optimizers have stepped
    for k in a["model"]:
        assert (a["model"][k] - b["model"][k]).abs().max().item() <= 1e-6, k
    args = m.parse_args(common)[0]
    args.__dict__.update(b["args"])
    lr = m.schedule(7, args)[0]
    for saved in b["optimizer"]:
        for group in saved["param_groups"]:
            assert group["lr"] == pytest.approx(lr * group["lr_scale"], rel=1e-12)


def test_muon_with_gradient_accumulation(tmp_path, monkeypatch, capsys, offline):
    """--grad_accum 2 with Muon: a step of two micro-batches of 2 is the step of one batch of 4 (the same windows:
    each step draws its micro-batches from one seeded stream), to float rounding."""
    needs_gpt2_bpe()
    m = importlib.import_module("gpt2")
    common = [*tiny("gpt2"), "--optimizer", "muon", "--max_iters", "3", "--eval_interval", "3", "--dropout", "0"]
    run_in(m, tmp_path / "one", [*common, "--batch_size", "4"], monkeypatch, capsys)
    run_in(m, tmp_path / "two", [*common, "--batch_size", "2", "--grad_accum", "2"], monkeypatch, capsys)
    a, b = (state(tmp_path / run / "out" / "gpt2" / "ckpt.pt") for run in ("one", "two"))
    moved = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert moved < 1e-4


def test_ddp_with_muon(tmp_path):
    """torchrun --nproc_per_node 2 on CPU with --optimizer muon and --grad_accum 2: both ranks train, the
    checkpoint holds AdamW's and Muon's states."""
    work = copy_script("gpt2", tmp_path / "work")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = run_script(work, ["gpt2.py", *tiny("gpt2"), "--max_iters", "2", "--eval_interval", "2", "--optimizer", "muon",
                          "--grad_accum", "2"], offline_env(tmp_path, tiktoken=False), launcher=launcher)
    assert r.returncode == 0, r.stderr
    assert "DDP x2" in r.stdout and r.stdout.count("done | 2 iters") == 1
    saved = state(work / "out" / "gpt2" / "ckpt.pt")
    assert saved["args"]["optimizer"] == "muon" and all(s["state"] for s in saved["optimizer"])


def test_refusals(tmp_path, monkeypatch, capsys, offline):
    """One line, exit 2: --optimizer muon on a torch without torch.optim.Muon (and --help says which torch), and a
    resume typed with another optimizer than the checkpoint's."""
    m = importlib.import_module("gpt2")
    with pytest.raises(SystemExit):
        m.parse_args(["--help"])
    assert "muon: torch 2.9 or later" in capsys.readouterr().out
    run_in(m, tmp_path, [*tiny("gpt2"), "--max_iters", "2", "--eval_interval", "2", "--optimizer", "muon"],
           monkeypatch, capsys)
    err = expect_exit(m, ["--init_from", "resume", "--device", "cpu", "--optimizer", "adamw"], capsys)
    assert "--optimizer adamw does not match" in err and "muon" in err
    monkeypatch.delattr(torch.optim, "Muon")
    err = expect_exit(m, [*tiny("gpt2"), "--optimizer", "muon"], capsys)
    assert "torch 2.9 or later" in err

