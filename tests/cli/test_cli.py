import json
import subprocess
import sys

import pytest
from conftest import TINY_CLIP_KWARGS

from sae_lens_vision_steer.cli import build_parser, main
from sae_lens_vision_steer.cli.common import EXIT_CONFLICT, EXIT_INPUT, EXIT_USAGE  # noqa: F401


def test_help_at_every_level(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    top = capsys.readouterr().out
    assert "zeroshot" in top
    sub = parser._subparsers._group_actions[0].choices
    for name, p in sub.items():
        assert p.format_help().count("--") > 1, name


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "sae_lens_vision_steer", "zeroshot", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--random-weights" in out and "--data-dir" in out


def test_zeroshot_cli_on_real_images(tmp_path, tiny_imagenet_dir, capsys):
    out = tmp_path / "zs.json"
    rc = main(["zeroshot", "--random-weights", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS),
               "--dataset", "tiny-imagenet", "--data-dir", str(tiny_imagenet_dir), "--split", "val",
               "--limit", "100", "--num-workers", "0", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "100 images evaluated" in printed
    res = json.loads(out.read_text())
    assert res["n_images"] == 100 and len(res["per_class_acc"]) == 200 and len(res["predictions"]) == 100
    assert res["templates"] == "imagenet"
    correct = sum(p == y for p, y in zip(res["predictions"], res["labels"]))
    assert abs(res["top1"] - correct) < 1e-6  # 100 images: percent == count


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    rc = main(["zeroshot", "--random-weights", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS),
               "--dataset", "imagefolder", "--data-dir", str(tmp_path / "missing"), "--device", "cpu"])
    assert rc == EXIT_INPUT
    assert "does not exist" in capsys.readouterr().err


def test_cli_reference_doc_is_current():
    """docs/cli.md is generated from the parser; regenerate with `python scripts/build_cli_docs.py`."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    import os

    rc = subprocess.run([sys.executable, str(root / "scripts" / "build_cli_docs.py"), "--check"],
                        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})  # this checkout
    assert rc.returncode == 0, rc.stderr
