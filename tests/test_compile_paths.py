"""The GPU path checked without a GPU: for every script, one training step of a tiny model (2 layers x 32, 16 tokens,
a 256-token vocabulary) under torch.compile with the aot_eager backend (dynamo's graph capture and AOTAutograd's
joint forward/backward graph, run by eager kernels: what inductor would compile, less the code generation) gives the
loss and every gradient of eager mode, to 1e-4 of the largest gradient; and one step under CPU bf16 autocast (the
dtype a GPU run uses) gives the float32 step's loss within 2% and its gradients within 10% (relative L2 norm over
all parameters). Measured (torch 2.13, CPU): aot_eager equal to eager bit for bit in all 11; bf16 loss within 4e-5
and gradients within 1.1e-2 (bitnet's, the quantizers' rounding; 3e-3 to 1e-2 for the others). Graph breaks are
allowed (fullgraph is not asked: the MoE dispatch reads its expert counts on the host); an error is not."""
import importlib
import time

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import SCRIPTS, ids
from test_export import CONFIGS, MODEL_CLASS

pytestmark = pytest.mark.usefixtures("one_thread")
V, T = 256, 16
CONFIGS = {**{s: kw for s, (kw, _) in CONFIGS.items()}, "lora": CONFIGS["gpt2"][0],
           "transformer_xl": dict(n_layer=2, n_embd=32, n_head=4, segment_len=8, mem_len=8)}
MODEL_CLASS = {**MODEL_CLASS, "transformer_xl": "TransformerXL"}


def tiny(script):
    """A fresh tiny model of script, float32, in training mode (dropout 0: the steps are deterministic)."""
    m = importlib.import_module(script)
    torch.manual_seed(0)
    cfg = {**CONFIGS[script], "vocab_size": V, "n_layer": 2, "n_embd": 32}
    cfg = {k: v for k, v in cfg.items() if k != "block_size"} | ({"block_size": T} if "block_size" in cfg else {})
    model = getattr(m, MODEL_CLASS[script])(m.Config(**cfg))
    if script == "lora":  # the adapters train, the base is frozen; B off zero so that A gets a gradient too
        m.add_lora(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    return model.train()


def step(model, forward, ctx):
    """(loss, {name: gradient}) of one step on a fixed batch."""
    model.zero_grad(set_to_none=True)
    x, y = ids(V, 2, T + 1, seed=1)[:, :-1], ids(V, 2, T + 1, seed=1)[:, 1:]
    with ctx:
        loss = forward(x, y)[1]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("script", [s for s in CONFIGS if s in SCRIPTS])
def test_compiled_and_bf16_steps(script):
    torch._dynamo.reset()
    counters.clear()
    model = tiny(script)
    fp32 = torch.autocast("cpu", enabled=False)
    loss, grads = step(model, model, fp32)
    assert grads and all(g.isfinite().all() for g in grads.values())

    t0 = time.perf_counter()
    compiled = torch.compile(model, backend="aot_eager")
    c_loss, c_grads = step(model, compiled, fp32)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did capture the model
    scale = max(g.abs().max().item() for g in grads.values())
    worst = max((grads[n] - c_grads[n]).abs().max().item() for n in grads) / scale
    print(f"{script}: aot_eager {time.perf_counter() - t0:.1f} s, loss diff {abs(c_loss - loss):.1e}, "
          f"gradient max diff / max gradient {worst:.1e}", end="; ")
    assert c_grads.keys() == grads.keys()
    assert abs(c_loss - loss) <= 1e-5 * abs(loss) and worst < 1e-4

    b_loss, b_grads = step(model, model, torch.autocast("cpu", dtype=torch.bfloat16))
    num = sum(((b_grads[n].float() - grads[n]) ** 2).sum() for n in grads) ** 0.5
    rel = (num / sum((g ** 2).sum() for g in grads.values()) ** 0.5).item()
    print(f"bf16: loss rel diff {abs(b_loss - loss) / abs(loss):.1e}, gradient rel L2 {rel:.1e}")
    assert b_grads.keys() == grads.keys()
    assert abs(b_loss - loss) <= 0.02 * abs(loss) and rel < 0.1
    torch._dynamo.reset()
