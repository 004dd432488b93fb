"""What every script shares (CONVENTIONS.md: the command line, logs, checkpoints, bad input), run over each script
present at the root. The runs call `main(argv)` in-process, each as if the script lived in its own folder (its data/ and
out/ there): a subprocess would only add seconds of imports. The DDP test runs the script alone in a folder, as a
reader would, under torchrun.
"""
import importlib
import json

import numpy as np
import pytest
import torch

from conftest import ROOT, SCRIPTS, copy_script, needs_gpt2_bpe, offline_env, run_torchrun, script_home

# A model small enough that a few iterations take seconds; every script accepts these flags, and --n_head those
# with attention heads (all but mamba.py).
HEADLESS = {"mamba"}


def tiny(script):
    heads = [] if script in HEADLESS else ["--n_head", "2"]
    return ["--device", "cpu", "--n_layer", "1", *heads, "--n_embd", "32", "--block_size", "32",
            "--batch_size", "4", "--eval_iters", "2", "--log_interval", "2", "--max_new_tokens", "16"]


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def state(ckpt_path):
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)


def run_in(module, home, argv, monkeypatch, capsys):
    """main(argv) with the script's data/ and out/ under home; its stdout."""
    script_home(module, home, monkeypatch)
    capsys.readouterr()
    module.main(argv)
    return capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_end_to_end_and_exact_resume(script, tmp_path, monkeypatch, capsys, offline):
    """The command line end to end (a run of 20 iterations: its lines, files and metrics); then the same 20
    iterations as 10, --init_from resume, 10 more: same weights, same losses; then --sample_only."""
    needs_gpt2_bpe()
    module = importlib.import_module(script)
    common = [*tiny(script), "--dropout", "0.1", "--eval_interval", "5", "--lr_decay_iters", "20", "--warmup_iters", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    out = run_in(module, straight, [*common, "--max_iters", "20"], monkeypatch, capsys)
    outs = [run_in(module, split, [*common, *extra], monkeypatch, capsys)
            for extra in (["--max_iters", "10"], ["--init_from", "resume", "--max_iters", "20"])]

    first = out.splitlines()[0]
    for word in (script, "cpu", "float32", "compile off", "params", "tokens/step", "data shakespeare", "tokenizer gpt2"):
        assert word in first, first
    assert "iter 2 | loss " in out and " tok/s" in out and "mfu" not in out  # no MFU on CPU
    assert "eval 5 | train " in out and f"saved out/{script}/ckpt.pt" in out
    assert "--- sample ---" in out and out.rstrip().splitlines()[-1].startswith("done | 20 iters | best val ")
    out_dir = straight / "out" / script
    assert (out_dir / "ckpt.pt").exists() and (out_dir / "best.pt").exists()
    records = read_metrics(out_dir)
    assert [r["iter"] for r in records if "loss" in r] == list(range(2, 21, 2))
    assert [r["iter"] for r in records if "val" in r] == [5, 10, 15, 20]
    meta = json.loads((straight / "data" / "shakespeare" / "meta.json").read_text())
    train, val = (int(np.fromfile(straight / "data" / "shakespeare" / f"{s}.bin", np.int32, 3)[2]) for s in ("train", "val"))
    assert meta["tokenizer"] == "gpt2" and abs(train - 9 * val) < 10  # 90/10 split, the counts in the files' headers

    assert "iter 12 | loss" in outs[1] and "iter 2 | loss" not in outs[1]  # the resumed run went on from 10
    a, b = state(straight / "out" / script / "ckpt.pt"), state(split / "out" / script / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 20
    for k in a["model"]:  # bit for bit in one process; a real resume bug moves the weights by 2e-3 or more
        diff = (a["model"][k] - b["model"][k]).abs().max().item()
        assert diff <= 1e-6, (k, diff)
    ma, mb = read_metrics(straight / "out" / script), read_metrics(split / "out" / script)
    assert [(m["iter"], sorted(m)) for m in ma] == [(m["iter"], sorted(m)) for m in mb]
    for x, y in zip(ma, mb):
        for key in ("loss", "train", "val", "lr"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=0, abs=1e-5), (x, y)

    # --sample_only from the checkpoint: no training, a greedy sample, the checkpoint untouched
    before = (split / "out" / script / "ckpt.pt").read_bytes()
    out = run_in(module, split, ["--init_from", "resume", "--sample_only", "--temperature", "0", "--max_new_tokens",
                                 "8"], monkeypatch, capsys)
    assert "--- sample from resume ---" in out and "iter " not in out
    assert (split / "out" / script / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_ddp_two_processes_offline(script, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo), with no network and no tiktoken files (one run for both, each
    subprocess costing seconds of imports): it says so and trains on the stdlib's source with byte tokens, rank
    0 preparing the data while rank 1 waits; both ranks train, only rank 0 logs and saves."""
    work = copy_script(script, tmp_path / "work")
    env = offline_env(tmp_path, tiktoken=False)
    r = run_torchrun(work, [f"{script}.py", *tiny(script), "--max_iters", "4", "--eval_interval", "4"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "offline: tiktoken" in r.stdout and "offline: cannot download tiny-shakespeare" in r.stdout
    assert "tokenizer bytes" in r.stdout and r.stdout.count("--- sample ---") == 1
    meta = json.loads((work / "data" / "python_stdlib" / "meta.json").read_text())
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 256
    assert "DDP x2" in r.stdout and r.stdout.count("done | 4 iters") == 1 and r.stdout.count("eval 4 |") == 1
    assert f"{2 * 4 * 32:,} tokens/step" in r.stdout  # world size x batch x block
    assert (work / "out" / script / "ckpt.pt").exists()


# ------------------------------------------------------------------------------- bad input, in-process

@pytest.fixture
def script_env(request, tmp_path, monkeypatch, offline):
    """The script's module, with its data/ and out/ under tmp_path and no network."""
    module = importlib.import_module(request.param)
    script_home(module, tmp_path, monkeypatch)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("To be, or not to be: that is the question.\n")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "adir").mkdir()
    return module, tmp_path


def expect_exit(module, argv, capsys, code=2):
    """Run main(argv); it must exit with `code` and, for bad input, say why in one line on stderr."""
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    lines = err.strip().splitlines()
    if code == 2:
        assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    return err


BAD_INPUTS = [
    (["--data", "missing.txt"], "no such file"),
    (["--data", "wikitext103"], "not a dataset name"),
    (["--data", "adir"], "is a directory"),
    (["--data", "empty.txt"], "is empty"),
    (["--data", "binary.bin"], "not UTF-8"),
    (["--data", "short.txt"], "too short"),
    (["--n_layer", "0"], "n_layer must be positive"),
    (["--block_size", "0"], "--block_size must be positive"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--max_iters", "-5"], "--max_iters must be positive"),
    (["--grad_accum", "0"], "--grad_accum must be positive"),
    (["--lr", "-1"], "--lr must not be negative"),
    (["--dropout", "1.5"], "dropout must be in [0, 1)"),
    (["--top_p", "2"], "--top_p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must not be negative"),
    (["--num_samples", "0"], "--num_samples must be positive"),
    (["--show_top", "-1"], "--show_top must not be negative"),
    (["--init_from", "resume"], "no checkpoint"),
    (["--init_from", "nosuchorg/nosuchmodel"], "cannot fetch"),
    (["--init_from", "./no_such_dir"], "not a checkpoint directory"),
    (["--sample_only"], "--sample_only needs"),
]
HEAD_INPUTS = [(["--n_embd", "30", "--n_head", "8"], "multiple of n_head"), (["--n_head", "-2"], "n_head must be positive")]
STATE_INPUTS = [(["--d_state", "0"], "d_state must be positive"), (["--d_conv", "-1"], "d_conv must be positive"),
                (["--n_head", "2"], "no attention heads")]
BAD_CASES = [pytest.param(script, argv, message, id=f"{script}-{' '.join(argv)}") for script in SCRIPTS
             for argv, message in BAD_INPUTS + (STATE_INPUTS if script in HEADLESS else HEAD_INPUTS)]


@pytest.mark.parametrize("script_env, argv, message", BAD_CASES, indirect=["script_env"])
def test_bad_input(script_env, argv, message, capsys):
    module, _ = script_env
    assert message in expect_exit(module, [*tiny(module.__name__), "--max_iters", "1", *argv], capsys)


@pytest.mark.parametrize("script_env", SCRIPTS, indirect=True)
def test_no_cuda_is_bad_input(script_env, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    module, _ = script_env
    assert "no CUDA device" in expect_exit(module, ["--device", "cuda", "--max_iters", "1"], capsys)


@pytest.mark.parametrize("script_env", SCRIPTS, indirect=True)
def test_bad_checkpoints_are_refused_and_kept(script_env, capsys):
    """A corrupt checkpoint, one whose shape differs from the flags, and a diverging run: each stops with a
    message and leaves the checkpoint on disk exactly as it was."""
    module, tmp = script_env
    name = module.__name__
    ckpt = tmp / "out" / name / "ckpt.pt"
    module.main([*tiny(name), "--max_iters", "2", "--eval_interval", "2", "--max_new_tokens", "2"])
    capsys.readouterr()
    good = ckpt.read_bytes()

    assert "does not match" in expect_exit(module, ["--init_from", "resume", "--n_layer", "3"], capsys)
    assert "does not match" in expect_exit(module, ["--init_from", "resume", "--n_embd", "64"], capsys)
    # a NaN/inf loss stops the run (exit 1) and keeps the last good checkpoint
    err = expect_exit(module, ["--init_from", "resume", "--max_iters", "6", "--lr", "1e30", "--min_lr", "1e30",
                               "--grad_clip", "0"], capsys, code=1)
    assert "diverged" in err
    assert ckpt.read_bytes() == good

    ckpt.write_bytes(good[: len(good) // 2])  # as if cut off mid-write by something other than our save
    assert "not a readable checkpoint" in expect_exit(module, ["--init_from", "resume"], capsys)
    ckpt.write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in expect_exit(module, ["--init_from", "resume"], capsys)
    assert ckpt.read_bytes() == b"not a checkpoint"  # refused, not overwritten


def test_readme_test_command_is_what_ci_runs():
    """.ci/run runs exactly the README's test command."""
    readme = (ROOT / "README.md").read_text()
    command = next(l.strip() for l in readme.splitlines() if l.strip().startswith("pip install -r tests/requirements.txt"))
    assert command in (ROOT / ".ci" / "run").read_text()
