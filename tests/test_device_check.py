"""benchmarks/device_check.sh runs end to end on the CPU at toy sizes (`--tiny`): every step the GPU check
takes (forward ceiling, caching from decoded tensors and from JPEG files, ten evaluation rows on one backbone
pass, SAE training from memory and from a store) runs, prints one line per figure and writes them as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["ViT-B-32/forward_ceiling", "ViT-B-32/cache_decoded", "ViT-B-32/cache_jpeg", "eval/ten_methods",
           "sae/train_memory", "sae/train_sae", "sae/train_sae_wall"]


@pytest.mark.slow  # 8-100 s on 2 shared cores: model builds, two caches, an evaluation and two SAE trainings
def test_device_check_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_CHECK_TIMEOUT": "600", "TQDM_DISABLE": "1"}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--tiny", "--device", "cpu",
                          "--json-out", str(out), "--work-dir", str(tmp_path / "work")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("device_check/")]
    assert [ln.split(":")[0].removeprefix("device_check/") for ln in lines] == FIGURES
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["tiny"] and report["precision"] == "fp32"
    values = {f["name"]: f["value"] for f in report["figures"]}
    assert list(values) == FIGURES and all(v > 0 for v in values.values())
    # The wall / fit ratio of train_sae is at least 1 (the fit is part of the wall time).
    assert values["sae/train_sae_wall"] >= 1.0
