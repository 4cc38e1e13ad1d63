"""Two forked gloo ranks (tests/dist_worker.py) that disagree on where to write, a command that runs in one
process only, and the summary of a cache resumed after a rank was killed (issue 19, items 6, 13, 16).

One launch runs every step in a row (starting the ranks costs more than the steps); the last step kills
rank 1 after its first shard, and this process then resumes that cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import TINY_CLIP_KWARGS, write_image_folder
from dist_worker import launch_forked
from saes import make_topk_sae

from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.cli.common import EXIT_USAGE

HOOK = "blocks.0.hook_resid_post"


def _common(data: Path) -> list[str]:
    return ["--random-weights", "--seed", "0", "--model", "ViT-B-32", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS),
            "--device", "cpu", "--dataset", "imagefolder", "--data-dir", str(data), "--split", "all",
            "--batch-size", "3", "--num-workers", "0", "--no-progress"]


def _cache(data: Path, out: Path) -> list[str]:
    # 12 images, one row each (CLS), in 6 shards of 2 rows
    return ["cache", *_common(data), "--hook", HOOK, "--dtype", "float32", "--shard-size", "2", "--out", str(out)]


def _eval(data: Path, sae: Path, out: Path) -> list[str]:
    return ["eval", *_common(data), "--sae", str(sae), "--hook", HOOK, "--templates", "single",
            "--methods", "zeroshot", "--no-plots", "--out", str(out)]


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_folders")
    data = write_image_folder(tmp / "images", n_classes=3, per_class=4, size=32)
    sae = make_topk_sae(hook=HOOK, seed=1)
    sae.cfg.metadata.model_name = "ViT-B-32"
    sae.save_model(tmp / "sae")
    # A complete cache of the same request in another folder: rank 1 is pointed at it.
    assert main(_cache(data, tmp / "other")) == 0
    other_before = _digest(tmp / "other")
    steps = [
        {"argv": _cache(data, tmp / "mine"), "rank_argv": {"1": ["--out", str(tmp / "other")]}},
        {"argv": _eval(data, tmp / "sae", tmp / "eval_mine"), "rank_argv": {"1": ["--out", str(tmp / "eval_other")]}},
        {"argv": ["train", "--cache", str(tmp / "other"), "--k", "4", "--expansion", "2", "--epochs", "1",
                  "--no-progress", "--out", str(tmp / "sae_trained")]},
        {"argv": _cache(data, tmp / "killed"), "kill_after_shards": {"1": 1}},
    ]
    plan = tmp / "plan.json"
    plan.write_text(json.dumps({"out": str(tmp), "steps": steps}))
    codes = launch_forked(plan, 2)
    reports = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    # rank 1 dies in the last step (and the launcher stops rank 0 there): the steps before it are reported
    assert len(reports[0]) >= len(steps) - 1 and codes[1] != 0, (codes, reports)
    return tmp, data, reports, other_before


def test_ranks_with_different_out_are_refused_before_any_work(launched):
    tmp, _, reports, other_before = launched
    cache = [reports[r][0] for r in range(2)]
    assert [s["rc"] for s in cache] == [EXIT_USAGE] * 2, cache
    msg = cache[0]["stderr"]
    assert "different cache folders" in msg and f"rank 0 has '{tmp / 'mine'}'" in msg, msg
    assert f"rank 1 has '{tmp / 'other'}'" in msg and cache[1]["stderr"] == ""  # printed once
    assert _digest(tmp / "other") == other_before  # the other cache: not one byte changed, no lock taken
    assert not (tmp / "mine").exists()  # nothing was created before the ranks agreed
    evals = [reports[r][1] for r in range(2)]
    assert [s["rc"] for s in evals] == [EXIT_USAGE] * 2, evals
    assert "different eval output folders" in evals[0]["stderr"] and evals[1]["stderr"] == ""
    assert not (tmp / "eval_mine").exists() and not (tmp / "eval_other").exists()


def test_a_one_process_command_is_refused_once(launched):
    tmp, _, reports, _ = launched
    train = [reports[r][2] for r in range(2)]
    assert [s["rc"] for s in train] == [EXIT_USAGE] * 2
    assert "vision-steer train runs in one process" in train[0]["stderr"]
    assert train[1]["stderr"] == ""  # rank 0 says it; rank 1 exits with the same code, silently
    assert not (tmp / "sae_trained").exists()


def test_resumed_cache_summary_counts_this_run_and_the_killed_one(launched, capsys):
    tmp, data, _, _ = launched
    killed = tmp / "killed"
    # The rows already cached (and intact), by an independent count: every shard any record names.
    records = json.loads((killed / "metadata.json").read_text())["shards"]
    records += [r for p in killed.glob("progress_rank*.json") for r in json.loads(p.read_text())["shards"]]
    done_rows = {r["first_row"]: r["n_rows"] for r in records
                 if hashlib.sha256((killed / r["file"]).read_bytes()).hexdigest() == r["sha256"]}
    before = sum(done_rows.values())
    assert 0 < before < 12  # rank 1 recorded its first shard before it died
    capsys.readouterr()
    assert main(_cache(data, killed)) == 0
    out = capsys.readouterr().out
    assert f"({12 - before} images cached by this run, {before} by an earlier run," in out, out
    assert main(_cache(data, killed)) == 0  # a complete cache, reused: nothing cached now
    assert "(0 images cached by this run, 12 by an earlier run," in capsys.readouterr().out
