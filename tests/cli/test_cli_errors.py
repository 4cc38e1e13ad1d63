"""Issue 11, "no tracebacks for user errors": each case ends in one line naming the file or flag, with a
hint, and its own exit code; numbers are checked before the first forward pass."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLIP_KWARGS, write_image_folder

from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.cli.common import (
    EXIT_CODES,
    EXIT_DEVICE,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT,
    EXIT_USAGE,
)

TINY = ["--random-weights", "--seed", "0", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu"]
HOOK = "blocks.1.hook_resid_post"


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("vision-steer")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def imgs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("errs")
    write_image_folder(root / "imgs" / "train", 2, 6, seed=1)
    write_image_folder(root / "imgs" / "val", 2, 3, seed=2)
    return root / "imgs"


def _cache_args(imgs: Path, out: Path, *extra: str) -> list[str]:
    return ["cache", *TINY, "--dataset", "imagefolder", "--data-dir", str(imgs), "--split", "train", "--hook", HOOK,
            "--num-workers", "0", "--batch-size", "4", "--shard-size", "4", "--no-progress", "--out", str(out), *extra]


def test_exit_codes_are_distinct_and_documented():
    assert len(set(EXIT_CODES)) == len(EXIT_CODES) == 8
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in doc


def test_unreadable_image_names_the_file_and_the_flag(imgs, tmp_path, capsys):
    bad = tmp_path / "imgs"
    write_image_folder(bad / "train", 2, 2)
    (bad / "train" / "class_0" / "broken.png").write_bytes(b"not a png")
    assert main(_cache_args(bad, tmp_path / "c")) == EXIT_INPUT
    line = _one_line(capsys.readouterr().err)
    assert "broken.png" in line and "--skip-bad-images" in line
    assert main(_cache_args(bad, tmp_path / "c", "--skip-bad-images")) == 0


def test_out_pointing_at_a_file(imgs, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(_cache_args(imgs, f)) != 0
    assert "is a file" in _one_line(capsys.readouterr().err)


def test_read_only_folder(imgs, tmp_path, capsys, monkeypatch):
    import sae_lens_vision_steer.core.fileio as fileio

    real = fileio.tempfile.NamedTemporaryFile

    def read_only(*a, **k):
        if str(tmp_path / "ro") in str(k.get("dir", "")):
            raise PermissionError(errno.EROFS, "Read-only file system", str(k.get("dir")))
        return real(*a, **k)

    monkeypatch.setattr(fileio.tempfile, "NamedTemporaryFile", read_only)
    (tmp_path / "ro").mkdir()
    assert main(["eval", *TINY, "--dataset", "imagefolder", "--data-dir", str(imgs), "--methods", "zeroshot",
                 "--num-workers", "0", "--no-progress", "--templates", "single", "--out", str(tmp_path / "ro")]) == EXIT_OUTPUT
    line = _one_line(capsys.readouterr().err)
    assert str(tmp_path / "ro") in line and "read-only" in line


def test_full_disk_then_resume(imgs, tmp_path, capsys, monkeypatch):
    import sae_lens_vision_steer.activation_cache.shards as writer  # where shards are written

    real, calls = writer.write_bytes_atomic, []

    def fill_up(path, data):
        calls.append(path)
        if len(calls) == 2:  # the second shard hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(writer, "write_bytes_atomic", fill_up)
    assert main(_cache_args(imgs, tmp_path / "c")) == EXIT_OUTPUT
    line = _one_line(capsys.readouterr().err)
    assert "shard_00001.safetensors" in line and "no space left" in line and "run the command again" in line
    monkeypatch.undo()
    assert main(_cache_args(imgs, tmp_path / "c")) == 0  # resumes after the one shard that was saved


def test_k_out_of_range_fails_before_training(imgs, tmp_path, capsys):
    assert main(_cache_args(imgs, tmp_path / "c")) == 0
    rc = main(["train", "--cache", str(tmp_path / "c"), "--k", "999", "--expansion", "1", "--device", "cpu",
               "--out", str(tmp_path / "s")])
    assert rc == EXIT_USAGE and "--k" in _one_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu(imgs, tmp_path, capsys):
    args = _cache_args(imgs, tmp_path / "c")
    args[args.index("--device") + 1] = "cuda"
    assert main(args) == EXIT_DEVICE
    assert "--device cuda" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "c").exists()


def test_metadata_that_is_not_an_object(imgs, tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metadata.json").write_text("[1, 2, 3]")
    assert main(_cache_args(imgs, tmp_path / "c")) == EXIT_INPUT
    line = _one_line(capsys.readouterr().err)
    assert "metadata.json is not an activation-cache metadata file" in line and "--overwrite" in line
    assert (tmp_path / "c" / "metadata.json").read_text() == "[1, 2, 3]"  # left as it was


def test_ctrl_c_says_what_was_saved(imgs, tmp_path, capsys, monkeypatch):
    import sae_lens_vision_steer.activation_cache.shards as writer  # where shards are written

    real, calls = writer.write_bytes_atomic, []

    def interrupt(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(writer, "write_bytes_atomic", interrupt)
    assert main(_cache_args(imgs, tmp_path / "c")) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted. 2 complete shard(s) (8 rows) are saved" in err and "resume" in err and "Traceback" not in err


def test_a_held_out_set_of_one_image_is_refused_before_training(imgs, tmp_path, capsys):
    from conftest import make_tiny_clip

    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.data import load_image_dataset

    model = make_tiny_clip()
    ds = load_image_dataset("imagefolder", "train", imgs, model.preprocess, limit=5)
    cache_activations(model, ds, HOOK, tmp_path / "c5", num_workers=0, show_progress=False)
    rc = main(["train", "--cache", str(tmp_path / "c5"), "--k", "4", "--expansion", "2", "--batch-size", "2",
               "--device", "cpu", "--no-progress", "--out", str(tmp_path / "s")])
    assert rc == EXIT_USAGE
    assert "held-out set has 1 row(s)" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "s" / ".final.tmp").exists() and not (tmp_path / "s" / "training_run.json").exists()
    assert main(["train", "--cache", str(tmp_path / "c5"), "--k", "4", "--expansion", "2", "--batch-size", "2",
                 "--holdout-fraction", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "s")]) == 0


@pytest.mark.parametrize("flags, needle", [
    (["--lam", "nan"], "--lam"), (["--gamma", "inf"], "--gamma"),
    (["--fvu-quantile", "0.9", "--reference-cache", "/no/such/cache"], "--reference-cache /no/such/cache"),
    (["--methods", "vs2pp", "--pool-cache", "/no/such/pool"], "--pool-cache /no/such/pool"),
])
def test_steering_inputs_are_checked_before_the_first_forward_pass(imgs, tmp_path, capsys, monkeypatch, flags, needle):
    import sae_lens_vision_steer.cli.eval as eval_cli

    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = ["eval", *TINY, "--dataset", "imagefolder", "--data-dir", str(imgs), "--no-progress", *flags,
            "--out", str(tmp_path / "e")]
    try:
        rc = main(args)
    except SystemExit as e:  # argparse: a usage line plus one error line
        rc = e.code
    assert rc in (EXIT_USAGE, EXIT_INPUT) and needle in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--epochs", "-1"], ["--warmup-steps", "-5"]])
def test_training_numbers_are_checked_by_the_parser(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as e:
        main(["train", "--cache", str(tmp_path), *flags, "--out", str(tmp_path / "s")])
    assert e.value.code == EXIT_USAGE and flags[0] in capsys.readouterr().err
