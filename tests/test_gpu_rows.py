"""benchmarks/gpu_rows.py --smoke: every bench's GPU code runs on the CPU with tiny models (compile off, 1 step), as
it will be run on a GPU, and gives positive, finite speeds; no bench is left out of the script."""
import math
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_rows  # noqa: E402

SPEEDS = ("tokens_per_s", "step_median_s", "time_s")  # train_throughput's; bench_lora's step; the forward rows' pass


def found(result, keys):
    """Every value of one of keys in a result (nested dicts and lists)."""
    if isinstance(result, dict):
        return [v for k, v in result.items() if k in keys] + [s for v in result.values() for s in found(v, keys)]
    if isinstance(result, list):
        return [s for v in result for s in found(v, keys)]
    return []


def test_every_bench_is_named():
    assert sorted(gpu_rows.BENCHES) == sorted(p.stem.removeprefix("bench_")
                                              for p in (ROOT / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("name", list(gpu_rows.BENCHES))
def test_smoke(name, one_thread, capsys):
    results, failed = gpu_rows.run([name], smoke=True)
    assert not failed, results[name]
    assert not found(results[name], ("error",)), results[name]  # a row that caught its own failure
    speeds = found(results[name], SPEEDS)
    assert speeds and all(isinstance(s, float) and math.isfinite(s) and s > 0 for s in speeds), speeds
    assert f"bench_{name}.py" in capsys.readouterr().out
