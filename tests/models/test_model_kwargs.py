"""Issue 19, items 1 and 15/16: which model kwargs a file may hold (architecture options of the family, checked
against the libraries' own signatures), loading-safety switches only from the user (with a warning), and a
pickle given as `pretrained` ends in one line, its payload never run."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from conftest import TINY_CLIP_KWARGS
from saes import payload_pickle

from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.core.errors import InputError, UsageError
from sae_lens_vision_steer.models.kwargs import (
    HF_OPTIONS,
    LOADING_SWITCHES,
    OPEN_CLIP_OPTIONS,
    TIMM_OPTIONS,
    check_file_model_kwargs,
    check_user_model_kwargs,
    family_of,
)

TINY = ["--random-weights", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu"]


def test_allowlists_name_real_architecture_arguments_of_each_library():
    import open_clip
    import timm.models.vision_transformer as vit
    import transformers
    from open_clip.model import CLIP

    open_clip_args = set(inspect.signature(CLIP.__init__).parameters) | set(
        inspect.signature(open_clip.create_model).parameters) | {"custom_text"}  # a model-config key
    assert OPEN_CLIP_OPTIONS <= open_clip_args, OPEN_CLIP_OPTIONS - open_clip_args
    assert TIMM_OPTIONS <= set(inspect.signature(vit.VisionTransformer.__init__).parameters)
    hf_attrs = {*vars(transformers.CLIPVisionConfig()), *vars(transformers.Dinov2Config()),
                *vars(transformers.CLIPConfig()), "attn_implementation"}
    assert HF_OPTIONS <= hf_attrs, HF_OPTIONS - hf_attrs
    for options in (OPEN_CLIP_OPTIONS, TIMM_OPTIONS, HF_OPTIONS):
        assert not options & LOADING_SWITCHES
    # open_clip's loading arguments are all classified as switches, not architecture
    loading = {"weights_only", "jit", "cache_dir", "pretrained_image_path", "pretrained_text_path", "require_pretrained"}
    assert loading <= set(inspect.signature(open_clip.create_model).parameters) and loading <= LOADING_SWITCHES
    assert {f.name for f in dataclasses.fields(open_clip.model.CLIPVisionCfg)} & LOADING_SWITCHES == {
        "timm_model_pretrained"}


def test_family_follows_the_loader_prefixes():
    assert [family_of(n) for n in ("ViT-B-32", "local-dir:x", "timm:vit_small", "hf:a/b", "dinov2-base")] == [
        "open_clip", "open_clip", "timm", "hf", "hf"]
    assert check_file_model_kwargs({"depth": 1}, "timm:vit_small_patch16_224", "f") == {"depth": 1}
    with pytest.raises(InputError, match="f: key 'depth' is not an architecture option of open_clip"):
        check_file_model_kwargs({"depth": 1}, "ViT-B-32", "f")


def test_user_switches_warn_and_safe_values_do_not():
    with pytest.warns(UserWarning, match="weights_only=False changes how model files are loaded"):
        check_user_model_kwargs({"weights_only": False})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_user_model_kwargs({"weights_only": True, "trust_remote_code": False, **TINY_CLIP_KWARGS})
    with pytest.raises(UsageError, match="'device' collides"):
        check_user_model_kwargs({"device": "cpu"})


def test_a_pickle_as_pretrained_is_one_line_and_its_payload_never_runs(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.pt"
    ckpt.write_bytes(payload_pickle(marker))
    rc = main(["zeroshot", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--pretrained", str(ckpt), "--device",
               "cpu", "--dataset", "imagefolder", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 3 and not marker.exists()
    assert f"pretrained {ckpt}" in err and "weights_only=True" in err and len(err.strip().splitlines()) == 1


def test_the_user_may_still_turn_a_switch_on_explicitly_with_a_warning(tmp_path):
    """An explicit keyword argument is the user's choice: it reaches the library (a plain tensor checkpoint
    loads either way), with a warning; it is not recorded with the model."""
    import torch

    from sae_lens_vision_steer import HookedCLIP

    torch.manual_seed(0)
    src = HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, **TINY_CLIP_KWARGS)
    ckpt = tmp_path / "plain.pt"
    torch.save(src.clip.state_dict(), ckpt)
    with pytest.warns(UserWarning, match="weights_only=False"):
        m = HookedCLIP.from_pretrained("ViT-B-32", pretrained=str(ckpt), weights_only=False, **TINY_CLIP_KWARGS)
    assert "weights_only" not in m.cfg.model_kwargs
    torch.testing.assert_close(m.clip.visual.proj, src.clip.visual.proj)


@pytest.mark.parametrize("kwargs,needle", [
    ('{"embed_dim": 32, "embed_dim": 64}', "key 'embed_dim' appears twice"),
    ('{"device": "cpu"}', "'device' collides"),
])
def test_duplicate_or_colliding_model_kwargs_are_one_line(tmp_path, capsys, kwargs, needle):
    try:
        rc = main(["zeroshot", "--random-weights", "--model-kwargs", kwargs, "--device", "cpu", "--dataset",
                   "imagefolder", "--data-dir", str(tmp_path)])
    except SystemExit as e:  # argparse's own usage error
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_a_pickle_as_a_timm_checkpoint_is_refused_too(tmp_path):
    """timm reads checkpoint files with torch.load(weights_only=True) and wraps the refusal in a RuntimeError:
    found along the exception chain, it is the same one-line InputError."""
    from sae_lens_vision_steer import HookedCLIP

    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.pth"
    ckpt.write_bytes(payload_pickle(marker))
    with pytest.raises(InputError, match=f"pretrained {ckpt}: its weights file cannot be read as data only"):
        HookedCLIP.from_pretrained("timm:vit_tiny_patch16_224", pretrained=str(ckpt), depth=1, img_size=32)
    assert not marker.exists()
