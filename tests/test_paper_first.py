"""The paper first (CONVENTIONS.md section 2): model sections wrapped at 100 columns with no measured figures in their
comments (those live in benchmarks/RESULTS.md), and a model whose forward sets no attribute: what the loss and the
log need comes back from forward (torch.compile recompiles on an attribute set inside it)."""
import re

import pytest
import torch

from conftest import ROOT, SCRIPTS, ids
from test_muon import built

MODEL_HEADING = re.compile(r"^# -+ model$")
FILES_HEADING = " files: checkpoints, token files, downloads"
# a measured figure: "14x slower", "1.7x faster", "123 ms", "45 s on", "2.3 GB/s"
FIGURE = re.compile(r"\d(\.\d+)?x (faster|slower)|\b\d+(\.\d+)? ?(ms|µs|us)\b|\d+ s (on|per|at)\b|GB/s")


def model_section(script):
    """(first line number, the lines) from the script's model heading to the files section's heading."""
    lines = (ROOT / f"{script}.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if MODEL_HEADING.match(line))
    end = next(i for i, line in enumerate(lines) if line.startswith("# ---") and line.endswith(FILES_HEADING))
    return start + 1, lines[start:end]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_model_section_is_wrapped_at_100_columns_without_figures(script):
    first, lines = model_section(script)
    wide = [first + i for i, line in enumerate(lines) if len(line) > 100]
    assert not wide, f"{script}.py: lines over 100 columns in the model section: {wide[:10]}"
    figures = [first + i for i, line in enumerate(lines) if "#" in line and FIGURE.search(line.split("#", 1)[1])]
    assert not figures, f"{script}.py: measured figures in the model section's comments: {figures[:10]}"


def attributes(model):
    """Every module's plain attributes (not its parameters, buffers or children), by module name."""
    return {name: {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
            for name, m in model.named_modules()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_forward_sets_no_attribute(script, offline, monkeypatch, tmp_path):
    """A training step's forward and backward and an eval forward leave every module's attributes as they were:
    the same objects, none added (a MoE's router terms and expert load come back in aux)."""
    monkeypatch.chdir(tmp_path)
    m, args, model = built(script)
    before = attributes(model)
    x = ids(model.config.vocab_size, 2, 17)
    out = model.train()(x[:, :-1], x[:, 1:])
    out[1].backward()
    with torch.no_grad():
        model.eval()(x[:, :-1], x[:, 1:])
    after = attributes(model)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].keys() == before[name].keys(), (name, after[name].keys() ^ before[name].keys())
        changed = [k for k in before[name] if after[name][k] is not before[name][k]]
        assert not changed, f"{script}.py: forward set {name}.{changed}"
    if len(out) == 3 and out[2]:  # the MoE files: the router terms for the log, the load for the reports
        assert torch.is_tensor(out[2]["load"]) and out[2]["load"].dim() == 2
