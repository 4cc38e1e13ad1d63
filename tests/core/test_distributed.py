"""Distributed caching and evaluation on CPU: two torchrun processes (gloo) against one process.

One torchrun launch runs every two-rank case in a row (tests/dist_worker.py), since starting the
processes costs more than the cases: a cache, a second launch into a locked folder, ranks that disagree
(cache and eval), --skip-bad-images, an evaluation, a sweep, and a cache whose rank 1 is killed after one
shard. The same commands then run in this process, and the results are compared byte for byte. The
ranks are forked from this process (`dist_worker.launch_forked`: env:// rendezvous, gloo), which saves
importing torch and the package twice more; the slow test runs the same launch through torchrun (and
`vision-steer run`, which trains an SAE).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CLIP_KWARGS, write_image_folder
from dist_worker import launch_forked
from saes import make_topk_sae

from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.cli.common import EXIT_CONFLICT, EXIT_USAGE
from sae_lens_vision_steer.core.fileio import exclusive_writer

HERE = Path(__file__).resolve().parents[1]  # tests/, where dist_worker.py is
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _common(data: Path) -> list[str]:
    return ["--random-weights", "--seed", "0", "--model", "ViT-B-32", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS),
            "--device", "cpu", "--dataset", "imagefolder", "--data-dir", str(data), "--split", "all",
            "--batch-size", "3", "--num-workers", "0", "--no-progress"]


def _cache(data: Path, out: Path) -> list[str]:
    # 12 images x 17 tokens in shards of 7 rows: shards start mid-image, and the ranks' runs meet
    # inside batch 2, which both ranks compute
    return ["cache", *_common(data), *sum((["--hook", h] for h in HOOKS), []), "--positions", "all",
            "--dtype", "float32", "--shard-size", "7", "--out", str(out)]


def _eval(data: Path, sae: Path, layers: Path, out: Path) -> list[str]:
    # an earlier hook: the rest of the tower is split over the ranks too; rec_all is a hooked pass
    return ["eval", *_common(data), "--sae", str(sae), "--hook", HOOKS[0], "--templates", "single",
            "--methods", "zeroshot,vs2,rec_final,rec_all", "--layer-saes", str(layers), "--no-plots",
            "--out", str(out)]


def _sweep(data: Path, sae: Path, out: Path) -> list[str]:
    return ["sweep", *_common(data), "--sae", str(sae), "--hook", HOOKS[0], "--templates", "single",
            "--lams", "1,2", "--gammas", "1.5,2", "--select-on", "train-holdout", "--train-split", "all",
            "--holdout-fraction", "0.5", "--out", str(out)]


def _run(data: Path, out: Path) -> list[str]:
    common = [a for a in _common(data) if a not in ("--split", "all")]
    return ["run", *common, "--train-split", "all", "--eval-split", "all", "--k", "4", "--expansion", "2",
            "--epochs", "2", "--train-batch-size", "4", "--sae-holdout-fraction", "0.25", "--templates", "single",
            "--out", str(out)]


def _files(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())
            if p.suffix in (".safetensors", ".npy")}


def _meta(root: Path) -> dict:
    meta = json.loads((root / "metadata.json").read_text())
    meta.pop("package_version")
    return meta


def _results(path: Path) -> dict:
    res = json.loads((path / "results.json").read_text())
    res.pop("timing")
    for row in res["methods"].values():
        row.pop("seconds")
    return res


def _launch(tmp: Path, launcher: str, with_run: bool = False):
    """Every two-rank case in one launch; returns (folder, data folder, each rank's step reports)."""
    data = write_image_folder(tmp / "images", n_classes=3, per_class=4, size=32)
    sae = make_topk_sae(hook=HOOKS[0], seed=1)
    sae.cfg.metadata.model_name = "ViT-B-32"
    sae.save_model(tmp / "sae")
    for i, h in enumerate(HOOKS):
        make_topk_sae(hook=h, seed=2 + i).save_model(tmp / "layers" / f"l{i}")
    steps = [
        {"argv": _cache(data, tmp / "cache2")},
        {"argv": _cache(data, tmp / "locked")},
        {"argv": _cache(data, tmp / "disagree"), "rank_argv": {"1": ["--seed", "1"]}},
        {"argv": _cache(data, tmp / "skip") + ["--skip-bad-images"]},
        {"argv": _eval(data, tmp / "sae", tmp / "layers", tmp / "eval2")},
        {"argv": _eval(data, tmp / "sae", tmp / "layers", tmp / "eval_disagree"), "rank_argv": {"1": ["--limit", "9"]}},
        {"argv": _sweep(data, tmp / "sae", tmp / "sweep2")},
        *([{"argv": _run(data, tmp / "run2")}] if with_run else []),  # trains an SAE: slow
        {"argv": _cache(data, tmp / "killed"), "kill_after_shards": {"1": 1}},
    ]
    plan = tmp / "plan.json"
    plan.write_text(json.dumps({"out": str(tmp), "steps": steps}))
    (tmp / "locked").mkdir()
    with exclusive_writer(tmp / "locked", "cache"):  # another launch is writing this folder
        if launcher == "fork":
            codes = launch_forked(plan, 2)
            log = ""
        else:  # the real launcher, in its own processes (importing everything again: slow)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "VISION_STEER_DIST_TIMEOUT_S": "120"}
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                   "2", "--monitor-interval", "0.2", str(HERE / "dist_worker.py"), str(plan)],
                                  env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
            codes, log = [proc.returncode], proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp / f"rank{r}.json").read_text()) if (tmp / f"rank{r}.json").is_file() else []
               for r in range(2)]
    assert len(reports[0]) >= 7 + with_run, log
    assert any(c != 0 for c in codes)  # rank 1 was killed in the last step, and the launcher says so
    return tmp, data, reports


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("dist"), "fork")


def test_two_ranks_write_the_one_process_cache(two_ranks):
    _check_cache(*two_ranks)


def _check_cache(tmp, data, reports):
    assert [r["rc"] for r in (reports[0][0], reports[1][0])] == [0, 0], reports[0][0]["stderr"]
    # only whole batches of the one-process grid reach the model; rank 0's run ends and rank 1's starts
    # inside batch 2 (image 6), which both compute: 3 + 2 batches
    assert [reports[r][0]["batches"] for r in range(2)] == [[3, 3, 3], [3, 3]]
    assert main(_cache(data, tmp / "cache1")) == 0
    one, two = _files(tmp / "cache1"), _files(tmp / "cache2")
    assert len(one) == 30 + 2 and one == two  # every shard, labels.npy and image_index.npy, byte for byte
    assert _meta(tmp / "cache1") == _meta(tmp / "cache2")  # statistics (float64 sums) included
    assert not list((tmp / "cache2").glob("progress_rank*")) and not list((tmp / "cache2").glob(".*.tmp"))


def test_bad_launches_are_refused_on_every_rank(two_ranks):
    tmp, _, reports = two_ranks
    locked, disagree, skip = ([reports[r][i] for r in range(2)] for i in (1, 2, 3))
    assert [s["rc"] for s in locked] == [EXIT_CONFLICT] * 2
    assert f"another process (pid {os.getpid()}) is writing the cache" in locked[0]["stderr"]
    assert locked[1]["stderr"] == ""  # rank 0's error is printed once
    assert not (tmp / "locked" / "metadata.json").exists()
    assert [s["rc"] for s in disagree] == [EXIT_USAGE] * 2
    msg = disagree[0]["stderr"]
    assert "different cache requests" in msg and "model_fingerprint: rank 0 has" in msg and "rank 1 has" in msg
    assert not (tmp / "disagree" / "metadata.json").exists()
    assert [s["rc"] for s in skip] == [EXIT_USAGE] * 2
    assert "--skip-bad-images is not supported by distributed caching" in skip[0]["stderr"]
    eval_disagree = [reports[r][5] for r in range(2)]
    assert [s["rc"] for s in eval_disagree] == [EXIT_USAGE] * 2
    msg = eval_disagree[0]["stderr"]
    assert "different evaluation requests" in msg and "n_images: rank 0 has 12, rank 1 has 9" in msg, msg
    assert not (tmp / "eval_disagree" / "results.json").exists()


def test_two_rank_eval_equals_one_process(two_ranks):
    tmp, data, reports = two_ranks
    assert [reports[r][4]["rc"] for r in range(2)] == [0, 0], reports[0][4]["stderr"]
    # each rank: its 2 grid batches for the backbone pass, and again for rec_all's hooked pass
    assert [reports[r][4]["batches"] for r in range(2)] == [[3, 3, 3, 3]] * 2
    assert main(_eval(data, tmp / "sae", tmp / "layers", tmp / "eval1")) == 0
    one, two = _results(tmp / "eval1"), _results(tmp / "eval2")
    assert one == two
    assert two["methods"]["rec_all"]["coverage"] == 1.0 and two["config"]["n_images"] == 12
    assert sorted(p.name for p in (tmp / "eval2").iterdir()) == sorted(p.name for p in (tmp / "eval1").iterdir())


def test_killed_rank_resumes_with_another_world_size(two_ranks):
    _check_killed(*two_ranks)


def _check_killed(tmp, data, reports):
    killed = tmp / "killed"
    meta = json.loads((killed / "metadata.json").read_text())
    assert meta["complete"] is False
    recorded = [r for p in killed.glob("progress_rank*.json") for r in json.loads(p.read_text())["shards"]]
    assert recorded  # rank 1 recorded a shard before it died (and maybe rank 0 some)
    for rec in recorded:  # nothing partial is recorded: every record names an intact file
        assert hashlib.sha256((killed / rec["file"]).read_bytes()).hexdigest() == rec["sha256"]
    assert main(_cache(data, killed)) == 0  # one process now: the rest is redistributed to it
    if not (tmp / "cache1" / "metadata.json").is_file():
        assert main(_cache(data, tmp / "cache1")) == 0
    assert _files(killed) == _files(tmp / "cache1")
    assert _meta(killed) == _meta(tmp / "cache1")
    assert not list(killed.glob("progress_rank*")) and not list(killed.glob(".*.tmp"))


def _sweep_json(folder: Path) -> dict:
    res = json.loads((folder / "sweep.json").read_text())
    res.pop("timing")
    res["sweep"].pop("seconds", None)
    return res


def test_two_rank_sweep_equals_one_process(two_ranks):
    tmp, data, reports = two_ranks
    assert [reports[r][6]["rc"] for r in range(2)] == [0, 0], reports[0][6]["stderr"]
    assert main(_sweep(data, tmp / "sae", tmp / "sweep1")) == 0
    assert _sweep_json(tmp / "sweep1") == _sweep_json(tmp / "sweep2")
    assert _results(tmp / "sweep1") == _results(tmp / "sweep2")  # the final evaluation at the chosen cell


def _check_run(tmp, data, reports):
    assert [reports[r][7]["rc"] for r in range(2)] == [0, 0], reports[0][7]["stderr"]
    assert main(_run(data, tmp / "run1")) == 0
    assert _files(tmp / "run1" / "cache_train") == _files(tmp / "run2" / "cache_train")
    one, two = _results(tmp / "run1"), _results(tmp / "run2")
    assert one["config"].pop("sae_path").endswith("run1/sae") and two["config"].pop("sae_path").endswith("run2/sae")
    assert one == two  # rank 0 trained the SAE on the same cache; rank 1 evaluated with the saved one


@pytest.mark.slow
def test_under_torchrun(tmp_path):
    """The same launch through torchrun itself (its environment, its elastic agent stopping rank 0 when
    rank 1 dies)."""
    launched = _launch(tmp_path, "torchrun", with_run=True)
    _check_cache(*launched)
    _check_killed(*launched)
    test_bad_launches_are_refused_on_every_rank(launched)
    test_two_rank_eval_equals_one_process(launched)
    test_two_rank_sweep_equals_one_process(launched)
    _check_run(*launched)  # vision-steer run: rank 0 trains, both evaluate
