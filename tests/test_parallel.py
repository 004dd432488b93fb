"""--fsdp (shared by every file; run here on llama2.py) and llama2.py's --tp, with two CPU processes on gloo under
torchrun, offline (the standard library's source, byte tokens). Three launches in all, each costing seconds:
DDP, FSDP, and one script that checks tensor parallelism in-process and then trains with --fsdp --tp 2."""
import json
import types

import pytest
import torch

from conftest import copy_script, offline_env, run_torchrun

# Two blocks with GQA (4 query heads on 2 kv heads: --tp 2 splits both), dropout (each rank's seed), gradient
# accumulation (FSDP's reduce-scatter on the last micro-step only), evals at 2 and 4 (a checkpoint gathered twice).
FLAGS = ["--device", "cpu", "--n_layer", "2", "--n_head", "4", "--n_kv_head", "2", "--n_embd", "32", "--block_size",
         "32", "--batch_size", "4", "--eval_iters", "2", "--log_interval", "2", "--max_new_tokens", "8", "--max_iters",
         "4", "--eval_interval", "2", "--grad_accum", "2", "--dropout", "0.1"]


def vals(out_dir):
    """{iter: val loss} of a run's metrics.jsonl."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["iter"]: r["val"] for r in map(json.loads, lines) if "val" in r}


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def max_state_diff(a, b):
    """The largest difference between two checkpoints' weights and optimizer states, which must hold the same names,
    the same parameter numbering and the same group settings."""
    assert a["model"].keys() == b["model"].keys()
    diffs = [(a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]]
    for oa, ob in zip(a["optimizer"], b["optimizer"], strict=True):
        assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
        diffs += [(oa["state"][i][k].float() - ob["state"][i][k].float()).abs().max().item()
                  for i in oa["state"] for k in oa["state"][i]]
    return max(diffs)


def resume_here(module, work, out_dir, monkeypatch, capsys):
    """--init_from resume in this process (no torchrun, no FSDP), 2 more iterations."""
    monkeypatch.setattr(module, "HERE", work)
    monkeypatch.chdir(work)
    module.main(["--device", "cpu", "--init_from", "resume", "--out_dir", str(out_dir), "--max_iters", "6"])
    return capsys.readouterr().out


def test_fsdp_equals_ddp_and_resumes_without_it(tmp_path, monkeypatch, capsys, offline):
    """The same run under DDP and --fsdp: the same val losses (1e-3 asked; measured: 1e-6 or closer), checkpoints
    in one layout with the same tensors (the FSDP one gathered whole, its optimizer states renumbered as torch
    numbers them); then each resumed in one process without FSDP: the two continue alike."""
    work, env = copy_script("llama2", tmp_path / "work"), offline_env(tmp_path, tiktoken=False)
    runs = {}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        r = run_torchrun(work, ["llama2.py", *FLAGS, "--out_dir", f"out/{name}", *extra], env, fresh=(f"out/{name}",))
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count("eval 4 |") == r.stdout.count("--- sample ---") == r.stdout.count("done | 4 iters") == 1
        runs[name] = r.stdout
    assert "| DDP x2" in runs["ddp"] and "| FSDP x2" in runs["fsdp"]
    ddp, fsdp = vals(work / "out" / "ddp"), vals(work / "out" / "fsdp")
    assert ddp.keys() == fsdp.keys() == {2, 4}
    for it in ddp:
        assert abs(ddp[it] - fsdp[it]) < 1e-3, (it, ddp, fsdp)
    assert max_state_diff(ckpt(work / "out/ddp/ckpt.pt"), ckpt(work / "out/fsdp/ckpt.pt")) < 1e-5

    import llama2
    outs = {name: resume_here(llama2, work, work / "out" / name, monkeypatch, capsys) for name in ("ddp", "fsdp")}
    for out in outs.values():
        assert "iter 6 | loss" in out and "iter 2 | loss" not in out and "DDP" not in out and "FSDP" not in out
    assert abs(vals(work / "out" / "ddp")[6] - vals(work / "out" / "fsdp")[6]) < 1e-5
    assert max_state_diff(ckpt(work / "out/ddp/ckpt.pt"), ckpt(work / "out/fsdp/ckpt.pt")) < 1e-5


TP_CHECK = r'''
import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
import llama2

dist.init_process_group("gloo")
torch.manual_seed(0)
model = llama2.Llama(llama2.Config(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
idx = torch.randint(0, 100, (2, 20))
want, want_tokens = model(idx)[0], model.generate(idx[:, :4], 12, temperature=0)  # one process: the whole model
llama2.tensor_parallel(model, init_device_mesh("cpu", (2,)))
heads = model.model.layers[0].self_attn.n_head, model.model.layers[0].self_attn.n_kv_head
got, got_tokens = model(idx)[0], model.generate(idx[:, :4], 12, temperature=0)
lines = [None, None]  # rank 0 prints both ranks' lines: their prints would interleave
dist.all_gather_object(lines, f"heads {heads} | logits diff {(got - want).abs().max().item():.3e} | "
                              f"tokens equal {torch.equal(got_tokens, want_tokens)}")
if dist.get_rank() == 0:
    print("".join(f"rank {rank} | {line}\n" for rank, line in enumerate(lines)), flush=True)
dist.init_process_group = lambda *args, **kwargs: None  # main's setup_device: this process group serves (a second
llama2.main(sys.argv[1:])                               # one on torchrun's store would wait on the first's keys)
'''


def no_tiktoken(name):
    raise OSError("no tiktoken files here")


def test_tensor_parallel_logits_and_training(tmp_path, monkeypatch, capsys, offline):
    """--tp 2: each rank holds half the heads (2 of 4 query heads, 1 of 2 kv heads) and half the SwiGLU width; the
    logits equal one process's within 1e-5 and greedy sampling gives the same tokens; then --fsdp --tp 2 on a
    1 x 2 mesh trains to the same val losses as one process with the same flags (each step's batch is the
    data-parallel rank's: both tensor-parallel ranks see it). A rate of 1e-2 from the first step makes a wrong
    batch or a wrong split show in four steps."""
    work, env = copy_script("llama2", tmp_path / "work"), offline_env(tmp_path, tiktoken=False)
    (work / "tp_check.py").write_text(TP_CHECK)
    argv = [*FLAGS, "--out_dir", "out/tp", "--dropout", "0", "--lr", "1e-2", "--warmup_iters", "1"]  # dropout: per head
    r = run_torchrun(work, ["tp_check.py", *argv, "--fsdp", "--tp", "2"], env, fresh=("out/tp",))
    assert r.returncode == 0, r.stdout + r.stderr
    checks = [line for line in r.stdout.splitlines() if line.startswith("rank ")]
    assert len(checks) == 2, r.stdout
    for line in checks:
        assert "heads (2, 1)" in line and "tokens equal True" in line, line
        assert float(line.split("logits diff ")[1].split()[0]) < 1e-5, line
    assert "| FSDP x1 | TP x2" in r.stdout and r.stdout.count("done | 4 iters") == 1 and "--- sample ---" in r.stdout

    import llama2
    monkeypatch.setattr(llama2, "HERE", work)
    monkeypatch.chdir(work)
    monkeypatch.setattr(llama2.tiktoken, "get_encoding", no_tiktoken)  # byte tokens, as the torchrun run had them
    llama2.main([*argv, "--out_dir", "out/one"])  # the same flags in one process, no FSDP, no TP
    one, tp = vals(work / "out" / "one"), vals(work / "out" / "tp")
    assert one.keys() == tp.keys() == {2, 4}
    for it in one:
        assert abs(one[it] - tp[it]) < 1e-4, (it, one, tp)  # measured 1e-6; with another rank's batch, 5e-2
    a, b = ckpt(work / "out/one/ckpt.pt")["model"], ckpt(work / "out/tp/ckpt.pt")["model"]  # gathered whole
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4  # measured 1e-5


def test_parallel_bad_input(monkeypatch, capsys, offline):
    """--fsdp or --tp without torchrun; --tp without --fsdp, not dividing the world size or the heads: one line each."""
    import llama2
    for argv, words in ((["--fsdp"], "--fsdp shards"), (["--tp", "2"], "launch with torchrun"),
                        (["--tp", "2", "--fsdp"], "--fsdp shards"), (["--tp", "0"], "--tp must be positive")):
        with pytest.raises(SystemExit) as e:
            llama2.main(["--device", "cpu", "--max_iters", "1", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    monkeypatch.setenv("RANK", "0")  # as under torchrun, with a world of 4
    cfg, env = llama2.Config(n_layer=1, n_head=4, n_kv_head=2, n_embd=32), types.SimpleNamespace(world=4)
    for tp, fsdp, words in ((2, False, "add --fsdp"), (3, True, "divide the world size (4)"),
                            (4, True, "divide the heads: n_head 4 and n_kv_head 2")):
        with pytest.raises(llama2.InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
            llama2.check_tp(tp, types.SimpleNamespace(fsdp=fsdp), cfg, env)
    llama2.check_tp(2, types.SimpleNamespace(fsdp=True), cfg, env)  # fits: no error
