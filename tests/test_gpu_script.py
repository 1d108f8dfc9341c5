"""bench/gpu/run.py, the one-command GPU check, dry-run on the CPU (Triton interpreter, tiny shapes) so that the
script cannot rot between the rare sessions that have a GPU: every stage runs, every output file is written, the
summary names the goals."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu/run.py", "--dry-run", "--out", str(out),
                           "--scratch", str(tmp_path / "scratch")], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["e2e.json", "e2e.png", "kernels.json", "kernels.png", "run.log", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    assert all(stage["rc"] == 0 for stage in summary["stages"].values()), summary["stages"]
    assert summary["stages"]["correctness"]["tests"] >= 2 and not summary["stages"]["correctness"]["failed"]
    kernels = json.loads((out / "kernels.json").read_text())
    assert {r["kernel"] for r in kernels["rows"]} >= {"ours_gla", "ours_liger", "pair_ours"}
    e2e = json.loads((out / "e2e.json").read_text())
    assert set(e2e["prefill"]["32"]["median_s"]) == {"original", "liger-sinks", "gla"}
    assert all(all(row["logits_finite"].values()) for row in e2e["decode"].values())
    assert "decode step at 32k within 1.1x" in (out / "summary.md").read_text()
