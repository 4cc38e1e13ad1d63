"""Issue 11, items 1-15: no data loss on resume, no silent wrong results. One test per item, on a tiny
random CLIP and generated image folders (a few dozen images)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CLIP_KWARGS, make_tiny_clip, write_image_folder
from PIL import Image
from saes import make_topk_sae

from sae_lens_vision_steer.activation_cache import CorruptCacheError, cache_activations
from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.cli.common import EXIT_CONFLICT, EXIT_OUTPUT, EXIT_USAGE
from sae_lens_vision_steer.core.errors import ConflictError
from sae_lens_vision_steer.data import load_image_dataset
from sae_lens_vision_steer.data.base import to_rgb
from sae_lens_vision_steer.evaluation import MethodOutput, evaluate, register_method
from sae_lens_vision_steer.training.trainer import sae_size, train_sae
from sae_lens_vision_steer.zeroshot.classifier import ZeroShotClassifier

FINAL = "blocks.1.hook_resid_post"
TINY = ["--random-weights", "--seed", "0", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images in train/ and val/ subfolders, a CLS cache of train/, an SAE trained on it (via the CLI)."""
    root = tmp_path_factory.mktemp("rel")
    write_image_folder(root / "imgs" / "train", 3, 8, seed=1)
    write_image_folder(root / "imgs" / "val", 3, 4, seed=2)
    data = ["--dataset", "imagefolder", "--data-dir", str(root / "imgs"), "--num-workers", "0", "--batch-size", "8"]
    assert main(["cache", *TINY, *data, "--split", "train", "--hook", FINAL, "--shard-size", "4", "--no-progress",
                 "--out", str(root / "cache")]) == 0
    assert main(["train", "--cache", str(root / "cache"), "--k", "4", "--expansion", "2", "--epochs", "2",
                 "--batch-size", "8", "--device", "cpu", "--no-progress", "--out", str(root / "sae")]) == 0
    return root, data


def _eval_args(world, *extra: str) -> list[str]:
    root, data = world
    return ["eval", *TINY, *data, "--split", "val", "--sae", str(root / "sae"), "--templates", "single",
            "--no-progress", *extra]


# 1 ------------------------------------------------------------------------------------------------
def test_resume_never_deletes_recorded_shards_next_to_a_stray_copy(world, tmp_path):
    root = tmp_path / "c"
    src = world[0] / "cache"
    complete = _files(src)
    root.mkdir()
    for name, data in complete.items():
        (root / name).write_bytes(data)
    meta = json.loads((root / "metadata.json").read_text())
    meta.update(complete=False, shards=meta["shards"][:2])  # as an interrupted run leaves it
    for k in ("stats", "arrays", "n_rows"):
        meta.pop(k, None)
    (root / "metadata.json").write_text(json.dumps(meta))
    (root / "labels.npy").unlink()
    (root / "image_index.npy").unlink()
    (root / "shard_00000 (copy).safetensors").write_bytes(complete["shard_00000.safetensors"])
    (root / ".shard_00003.safetensors.x1y2.tmp").write_bytes(b"half a shard")  # a crash's leftover
    model = make_tiny_clip()
    ds = load_image_dataset("imagefolder", "train", world[0] / "imgs", model.preprocess)
    cache_activations(model, ds, FINAL, root, shard_size=4, batch_size=8, num_workers=0, show_progress=False)
    after = _files(root)
    assert after.pop("shard_00000 (copy).safetensors") == complete["shard_00000.safetensors"]  # not ours: kept
    assert not (root / ".shard_00003.safetensors.x1y2.tmp").exists()
    assert after == complete  # every recorded shard survived and the rest was redone to the same bytes


# 2 ------------------------------------------------------------------------------------------------
def test_unwritable_out_is_refused_before_work_and_the_table_is_printed_before_saving(world, tmp_path, capsys,
                                                                                     monkeypatch):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    import sae_lens_vision_steer.evaluation.runner as evaluation  # the module whose global the runner looks up

    calls = []
    monkeypatch.setattr(evaluation, "cache_hook_tokens",
                        lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError("backbone ran")))
    assert main(_eval_args(world, "--out", str(a_file))) == EXIT_OUTPUT
    assert "is a file, not a folder" in capsys.readouterr().err and not calls
    monkeypatch.undo()

    import errno

    import sae_lens_vision_steer.evaluation.results as results

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ev" / "results.json"))

    monkeypatch.setattr(results, "write_json_atomic", full_disk)
    assert main(_eval_args(world, "--out", str(tmp_path / "ev"))) == EXIT_OUTPUT
    out, err = capsys.readouterr()
    assert "Δtop-1" in out and "vs2" in out  # the numbers reached the user
    assert "no space left on the device" in err and "Traceback" not in err


# 3 ------------------------------------------------------------------------------------------------
def test_results_of_another_request_are_refused_and_overwrite_removes_stale_outputs(world, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(_eval_args(world, "--methods", "zeroshot,vs2,rec_final", "--out", str(out))) == 0
    assert (out / "per_class_rec_final.png").is_file()
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main(_eval_args(world, "--lam", "1.0", "--methods", "zeroshot,vs2", "--out", str(out))) == EXIT_CONFLICT
    assert "lam: folder has 2.1, request has 1.0" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before  # nothing lost
    assert main(_eval_args(world, "--lam", "1.0", "--methods", "zeroshot,vs2", "--overwrite", "--out", str(out))) == 0
    assert not (out / "per_class_rec_final.png").exists() and (out / "per_class_vs2.png").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["lam"] == 1.0 and list(saved["methods"]) == ["zeroshot", "vs2"]


# 4 ------------------------------------------------------------------------------------------------
def test_a_second_train_writer_is_refused(world, tmp_path):
    out = tmp_path / "sae"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"4242", 0)
        with pytest.raises(ConflictError, match=r"another process \(pid 4242\) is writing the SAE training run"):
            train_sae(world[0] / "cache", k=4, expansion_factor=2, epochs=1, batch_size=8, out_dir=out,
                      show_progress=False)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert not (out / "training_run.json").exists()


# 5 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--k", "0"], ["--expansion", "0"], ["--k", "-3"]])
def test_zero_and_negative_sizes_are_refused(world, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as e:
        main(["train", "--cache", str(world[0] / "cache"), *flags, "--out", str(tmp_path / "s")])
    assert e.value.code == EXIT_USAGE and flags[0] in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_eval_args(world, "--n-neighbours", "0"))


def test_k_above_d_sae_is_refused_before_any_work(world, tmp_path, capsys):
    assert main(["train", "--cache", str(world[0] / "cache"), "--k", "1000", "--expansion", "2",
                 "--out", str(tmp_path / "s")]) == EXIT_USAGE
    assert "k=1000 (--k) is larger than d_sae" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# 6 ------------------------------------------------------------------------------------------------
def test_reference_cache_is_checked_like_the_pool(world, tmp_path):
    from sae_lens_vision_steer.sae.loading import load_sae
    from sae_lens_vision_steer.steering import fvu_threshold_from_reference

    root = world[0]
    sae = load_sae(root / "sae")
    model = make_tiny_clip()
    ds = load_image_dataset("imagefolder", "train", root / "imgs", model.preprocess)
    cache_activations(model, ds, FINAL, tmp_path / "patches", positions="patches", num_workers=0, show_progress=False)
    cache_activations(model, ds, "blocks.0.hook_resid_post", tmp_path / "b0", num_workers=0, show_progress=False)
    with pytest.raises(ValueError, match="positions='patches'"):
        fvu_threshold_from_reference(sae, tmp_path / "patches", 0.9, model=model)
    with pytest.raises(ValueError, match="not the SAE's hook"):
        fvu_threshold_from_reference(sae, tmp_path / "b0", 0.9, model=model)
    with pytest.raises(ValueError, match="other model weights"):
        fvu_threshold_from_reference(sae, root / "cache", 0.9, model=make_tiny_clip(seed=1))
    assert 0 < fvu_threshold_from_reference(sae, root / "cache", 0.9, model=model) < float("inf")


# 7 ------------------------------------------------------------------------------------------------
def test_saes_are_refused_at_positions_and_hooks_they_were_not_trained_on(world, tiny_clip):
    from sae_lens_vision_steer.evaluation import Evaluator
    from sae_lens_vision_steer.sae.metadata import sae_hook_name
    from sae_lens_vision_steer.steering import VS2Steering

    sae = make_topk_sae(d_in=tiny_clip.cfg.d_model)
    sae.cfg.metadata.positions = "patches"
    with pytest.raises(ValueError, match="trained on positions='patches' but is applied to 'cls'"):
        VS2Steering(sae)
    VS2Steering(sae, positions="patches")  # where it was trained: fine
    ds = load_image_dataset("imagefolder", "val", world[0] / "imgs", tiny_clip.preprocess)
    clf = ZeroShotClassifier(tiny_clip, ds.classnames, "single", show_progress=False)
    with pytest.raises(ValueError, match="positions='patches'"):
        Evaluator(tiny_clip, ds, sae, clf, num_workers=0, show_progress=False)
    sae.cfg.metadata.positions = "all"
    VS2Steering(sae)  # an SAE trained on every token covers the CLS token
    with pytest.raises(ValueError, match="trained on hook 'blocks.1.hook_resid_post', not 'blocks.0.hook_resid_post'"):
        sae_hook_name(sae, "blocks.0.hook_resid_post")


# 8 ------------------------------------------------------------------------------------------------
def test_high_bit_depth_greyscale_is_scaled_not_clipped(tmp_path):
    grad16 = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(grad16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")
        rgb = np.asarray(to_rgb(img))
    expected = np.round(grad16 / 257.0).astype(np.uint8)  # 65535 -> 255 linearly
    assert rgb.shape == (32, 32, 3) and np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert 120 < rgb.mean() < 135  # was ~254 (clipped white)
    f01 = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    assert np.abs(np.asarray(to_rgb(Image.fromarray(f01)))[..., 0] - np.round(f01 * 255)).max() <= 1
    i32 = np.full((4, 4), 300000, dtype=np.int32)
    i32[0, 0] = 0
    out = np.asarray(to_rgb(Image.fromarray(i32)))[..., 0]
    assert out[0, 0] == 0 and out[1, 1] == 255  # an unknown range is stretched


# 9 ------------------------------------------------------------------------------------------------
def test_a_complete_cache_is_reverified_and_repaired_shard_by_shard(world, tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    good = _files(world[0] / "cache")
    for name, data in good.items():
        (root / name).write_bytes(data)
    shard = root / "shard_00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    mtime0 = (root / "shard_00000.safetensors").stat().st_mtime_ns
    model = make_tiny_clip()
    ds = load_image_dataset("imagefolder", "train", world[0] / "imgs", model.preprocess)
    kw = dict(shard_size=4, batch_size=8, num_workers=0, show_progress=False)
    with pytest.raises(CorruptCacheError, match=r"shard_00002.safetensors is corrupt.*--repair"):
        cache_activations(model, ds, FINAL, root, **kw)
    cache_activations(model, ds, FINAL, root, repair=True, **kw)
    assert _files(root) == good  # the same bytes as the original
    assert (root / "shard_00000.safetensors").stat().st_mtime_ns == mtime0  # intact shards not redone


# 10 -----------------------------------------------------------------------------------------------
def test_vs2pp_pool_made_from_the_evaluation_split_is_refused(world, tiny_clip, tmp_path):
    ds = load_image_dataset("imagefolder", "val", world[0] / "imgs", tiny_clip.preprocess)
    cache_activations(tiny_clip, ds, FINAL, tmp_path / "pool", num_workers=0, show_progress=False)
    sae = make_topk_sae(d_in=tiny_clip.cfg.d_model)
    clf = ZeroShotClassifier(tiny_clip, ds.classnames, "single", show_progress=False)
    with pytest.raises(ValueError, match="evaluation split itself"):
        evaluate(tiny_clip, ds, sae, ["vs2pp"], classifier=clf, num_workers=0, show_progress=False,
                 options={"pool_cache": str(tmp_path / "pool")})


# 11 -----------------------------------------------------------------------------------------------
def test_the_fvu_gate_is_per_method_and_gates_vs2_only_by_default(world, tiny_clip):
    seen = []

    @register_method("_gate_probe", needs_sae=False)
    def probe(tokens_ND, ctx, *, fvu_threshold=None, **_):
        seen.append(fvu_threshold)
        return MethodOutput(tokens=tokens_ND)

    ds = load_image_dataset("imagefolder", "val", world[0] / "imgs", tiny_clip.preprocess)
    clf = ZeroShotClassifier(tiny_clip, ds.classnames, "single", show_progress=False)
    sae = make_topk_sae(d_in=tiny_clip.cfg.d_model)
    kw = dict(classifier=clf, num_workers=0, show_progress=False, fvu_threshold=0.0)  # tau 0: gates everything
    res = evaluate(tiny_clip, ds, sae, ["vs2", "_gate_probe"], **kw)
    assert seen == [None] and res.methods["vs2"].coverage == 0.0
    assert res.config["gated_methods"] == ["vs2"] and res.methods["_gate_probe"].settings["fvu_threshold"] is None
    res = evaluate(tiny_clip, ds, sae, ["vs2", "_gate_probe"], gate_methods=("_gate_probe",), **kw)
    assert seen[-1] == 0.0 and res.methods["vs2"].coverage == 1.0 and res.config["gated_methods"] == ["_gate_probe"]


# 12 -----------------------------------------------------------------------------------------------
def test_rec_all_with_layer_saes_for_some_blocks_only_is_refused(world, tiny_clip):
    ds = load_image_dataset("imagefolder", "val", world[0] / "imgs", tiny_clip.preprocess)
    clf = ZeroShotClassifier(tiny_clip, ds.classnames, "single", show_progress=False)
    one = make_topk_sae(d_in=tiny_clip.cfg.d_model, hook=FINAL)
    with pytest.raises(ValueError, match=r"covers blocks \[1\] only \(missing \[0\]\)"):
        evaluate(tiny_clip, ds, None, ["rec_all"], classifier=clf, num_workers=0, show_progress=False,
                 options={"layer_saes": [one]})
    both = [make_topk_sae(d_in=tiny_clip.cfg.d_model, hook="blocks.0.hook_resid_post"), one]
    res = evaluate(tiny_clip, ds, None, ["rec_all"], classifier=clf, num_workers=0, show_progress=False,
                   options={"layer_saes": both})
    assert "rec_all" in res.methods


# 13 -----------------------------------------------------------------------------------------------
def test_imagefolder_without_split_subfolders_needs_an_explicit_split(tmp_path, capsys):
    flat = write_image_folder(tmp_path / "photos", 2, 3)
    with pytest.raises(ValueError, match=r"has no train/ subfolder.*--split all"):
        load_image_dataset("imagefolder", "train", flat)
    whole = load_image_dataset("imagefolder", "all", flat)
    assert len(whole) == 6 and whole.split == "all" and whole.dataset_id == "imagefolder:photos"
    rc = main(["run", *TINY, "--dataset", "imagefolder", "--data-dir", str(flat), "--num-workers", "0",
               "--no-progress", "--out", str(tmp_path / "run")])
    assert rc == EXIT_USAGE and "no train/ subfolder" in capsys.readouterr().err


# 14 -----------------------------------------------------------------------------------------------
def test_cli_takes_the_model_from_the_sae_and_train_applies_the_presets(world, tmp_path, capsys):
    from sae_lens_vision_steer.cli.common import resolve_model_args

    root, data = world
    # no --model, --model-kwargs or --random-weights: all from the SAE (a random-weight 2-block tiny tower)
    args = ["eval", *data, "--split", "val", "--sae", str(root / "sae"), "--templates", "single", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "ev")]
    assert main(args) == 0
    cfg = json.loads((tmp_path / "ev" / "results.json").read_text())["config"]
    assert cfg["model"] == "ViT-B-32" and cfg["pretrained"] is None and cfg["model_config"]["n_layers"] == 2
    assert "from the SAE's metadata" in capsys.readouterr().out
    assert main(["sweep", *data, "--split", "val", "--sae", str(root / "sae"), "--templates", "single",
                 "--device", "cpu", "--lams", "1", "--gammas", "1.5", "--no-progress",
                 "--out", str(tmp_path / "sw")]) == 0
    assert sae_size("ViT-B-32") == (64, 4, "the paper's preset for ViT-B-32")
    assert sae_size("ViT-L-14")[:2] == (128, 10) and sae_size("custom")[:2] == (64, 4)
    import argparse

    ns = argparse.Namespace(model="local-dir:/home/you/ckpt", pretrained=None, model_kwargs=None,
                            random_weights=False, seed=0)
    resolve_model_args(ns)
    assert ns.pretrained is None  # weights come with the name: no "openai" recorded


# 15 -----------------------------------------------------------------------------------------------
def test_published_metadata_is_portable_and_fills_saelens_fields(world, tmp_path):
    from sae_lens_vision_steer.hub.publish import publish_sae

    sae_dir = world[0] / "sae"
    meta = json.loads((sae_dir / "cfg.json").read_text())["metadata"]
    assert meta["dataset"] == "imagefolder:imgs" and meta["dataset_path"] == "imagefolder:imgs"
    assert str(world[0]) not in json.dumps(meta)
    assert meta["model_class_name"] == "HookedCLIP" and meta["seqpos_slice"] == [0, 1]
    assert meta["context_size"] == 1 + (32 // 8) ** 2 and meta["positions"] == "cls"
    assert meta["model_config"]["n_layers"] == 2 and meta["model_kwargs"] == meta["model_from_pretrained_kwargs"]
    local = tmp_path / "local_sae"
    local.mkdir()
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    cfg["metadata"]["model_name"] = "local-dir:/home/you/my_ckpt"
    (local / "cfg.json").write_text(json.dumps(cfg))
    for name in ("sae_weights.safetensors", "sparsity.safetensors"):
        (local / name).write_bytes((sae_dir / name).read_bytes())
    res = publish_sae(local, "org/vision-saes", "x", eval_results=False, dry_run_dir=tmp_path / "dry")
    published = (res.dry_run_dir / "x" / "cfg.json").read_text()
    assert "local-dir:my_ckpt" in published and "/home/you" not in published
    res = publish_sae(sae_dir, "org/vision-saes", "y", eval_results=False, dry_run_dir=tmp_path / "dry2")
    card = (res.dry_run_dir / "README.md").read_text()  # ViT-B-32 shrunk by --model-kwargs: the card says so
    assert "architecture changed from the stock config" in card and "n_layers=2" in card
