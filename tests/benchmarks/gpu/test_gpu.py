"""`opd bench gpu` on a CPU at toy sizes, as it must run on a bare GPU machine: without datasets and TRL installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu.run import PAIRS, QWEN3, compare, markdown, parse

ROOT = Path(__file__).resolve().parents[3]
BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # `import name` fails, as if not installed\n"


def without(tmp_path: Path, *names: str) -> dict:
    """An environment whose Python processes (the workers too) cannot import `names`."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCK.format(names=names))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), str(ROOT)]))


def test_the_driver_imports_without_tyro_datasets_trl_or_matplotlib(tmp_path):
    code = "import benchmarks.gpu.run as g; print(g.parse(['--quick', '--device', 'cpu']).lengths)"
    env = without(tmp_path, "tyro", "datasets", "trl", "matplotlib")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[32, 64]"


def test_qwen3_shapes_are_the_real_configs():
    # hidden, layers, heads, kv heads, intermediate (Qwen3's config.json of each size)
    want = {"0.6B": (1024, 28, 16, 8, 3072), "1.7B": (2048, 28, 16, 8, 6144), "4B": (2560, 36, 32, 8, 9728),
            "8B": (4096, 36, 32, 8, 12288)}
    for name, shape in want.items():
        c = QWEN3[name]
        assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
                c["intermediate_size"]) == shape
    assert QWEN3["8B"]["tie_word_embeddings"] is False and all(":" in p for p in PAIRS)


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_quick_run_on_cpu_without_datasets_and_trl(tmp_path, dtype):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "benchmarks.gpu.run", "--quick", "--device", "cpu", "--dtype", dtype,
               "--out", str(out), "--work", str(tmp_path / "work")]
    done = subprocess.run(command, env=without(tmp_path, "datasets", "trl"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "gpu_quick.json").read_text())
    assert results["quick"] and results["dtype"] == dtype and results["matmul_gflops"] > 0
    rows = results["rows"]
    assert {(r["length"], r["system"]) for r in rows} == {(n, s) for n in parse(["--quick"]).lengths
                                                          for s in ("opd", "trl_distillation")}
    for r in rows:
        if r["system"] == "trl_distillation":
            assert r["failed"] == "not importable: trl is not installed"
            continue
        assert r["failed"] is None, r
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and 0 < r["mfu"] < 1
        assert r["completion_tokens"] == r["length"] and r["step_s"] > r["teacher_s"] > 0
        assert all(loss > 0 for loss in r["losses"])
    assert compare(rows) == []  # nothing to hold opd against without TRL
    assert "not importable" in markdown(results)


def test_comparison_takes_opd_over_trl_per_pair_and_length():
    rows = [{"pair": "a", "length": 1024, "system": "opd", "tokens_per_s": 300.0, "peak_gpu_mb": 1000.0},
            {"pair": "a", "length": 1024, "system": "trl_distillation", "tokens_per_s": 100.0, "peak_gpu_mb": 4000.0},
            {"pair": "a", "length": 4096, "system": "opd", "tokens_per_s": 50.0, "peak_gpu_mb": 2000.0},
            {"pair": "a", "length": 4096, "system": "trl_distillation", "failed": "CUDA out of memory"}]
    assert compare(rows) == [{"pair": "a", "length": 1024, "speed": 3.0, "memory": 0.25}]
