"""benchmarks/architectures.py runs end to end on CPU (--tiny) and reports every architecture."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "architectures.py"


@pytest.mark.slow  # three tiny models trained and decoded: 5 s on an idle many-core CPU, 30 s+ on a busy one
def test_tiny_run_writes_every_architecture(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_architectures", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "architectures.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [row["arch"] for row in saved["rows"]] == ["diffllama", "diffllama-v2", "llama"]
    counts = [row["parameters"] for row in saved["rows"]]
    assert max(counts) / min(counts) < 1.02  # the tiny trio
    assert all(row["train_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 for row in saved["rows"])
    ratio = saved["rows"][1]["step_ms"] / saved["rows"][2]["step_ms"]
    assert saved["v2_step_over_llama"] == pytest.approx(ratio, abs=1e-3)
    assert saved["v2_within_target"] == (saved["v2_step_over_llama"] <= 1.15)
    assert "V2 training step / Llama's" in capsys.readouterr().out
