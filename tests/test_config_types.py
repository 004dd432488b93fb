"""config.json values of the wrong type (a string, a list, null where a number belongs) are bad input like a wrong flag:
from_pretrained raises InputError (one line on the command line), never a TypeError from inside a Config or a model."""
import importlib
import json

import pytest
import torch

from conftest import SCRIPTS
from test_export import CONFIGS, MODEL_CLASS

CONFIGS = {**CONFIGS, "lora": CONFIGS["gpt2"],
           "transformer_xl": (dict(vocab_size=300, n_layer=2, n_embd=32, n_head=4, segment_len=8, mem_len=8), None)}
MODEL_CLASS = {**MODEL_CLASS, "transformer_xl": "TransformerXL"}
LAYERS = {"gpt2": "n_layer", "lora": "n_layer", "transformer_xl": "n_layer"}  # else num_hidden_layers


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{script: (module, a directory save_pretrained wrote for a tiny model)}, made once."""
    out = {}
    for script in [s for s in CONFIGS if s in SCRIPTS]:
        m = importlib.import_module(script)
        torch.manual_seed(0)
        model = getattr(m, MODEL_CLASS[script])(m.Config(**CONFIGS[script][0]))
        if script == "lora":  # its save_pretrained writes the adapters too
            m.add_lora(model)
        path = tmp_path_factory.mktemp(script)
        m.save_pretrained(model, path)
        out[script] = m, path
    return out


@pytest.mark.parametrize("script", [s for s in CONFIGS if s in SCRIPTS])
def test_wrong_types_in_config_json(saved, script, tmp_path):
    """The layer count as "two", [2], 2.5 or true: InputError. Every other number, bool or object of config.json as a
    string, a list, null or an object: InputError, or loaded (a key the file does not read, or may be null), never
    another exception."""
    m, path = saved[script]
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    good = json.loads((path / "config.json").read_text())
    layers = LAYERS.get(script, "num_hidden_layers")
    assert isinstance(good[layers], int)
    cases = [(layers, bad, True) for bad in ("two", [2], 2.5, True)]
    cases += [(k, bad, False) for k, v in good.items() if type(v) in (int, float, bool, dict)
              for bad in ("two", [v], None, {"a": 1})]
    for key, bad, must_refuse in cases:
        (tmp_path / "config.json").write_text(json.dumps({**good, key: bad}))
        try:
            m.from_pretrained(tmp_path)
        except m.InputError as e:
            assert "\n" not in str(e)
            assert not must_refuse or "must be int, got" in str(e), str(e)  # Config's own check names the field
            continue
        assert not must_refuse, (key, bad)


@pytest.mark.parametrize("script", [s for s in CONFIGS if s in SCRIPTS])
def test_config_checks_its_types(script):
    """Config itself (as a checkpoint's config dict rebuilds it on resume): a value of the wrong type is InputError."""
    m = importlib.import_module(script)
    for key, bad in (("n_layer", "two"), ("n_embd", [32]), ("n_layer", None), ("dropout", "0.1")):
        with pytest.raises(m.InputError, match=f"{key} must be"):
            m.Config(**{**CONFIGS[script][0], key: bad})
    m.Config(**{**CONFIGS[script][0], "dropout": 0})  # an int for a float is a number
