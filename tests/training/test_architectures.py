"""Every SAELens training architecture on image activations, and transcoders: SAELens' own classes and
registry, saved as SAELens saves (plain `SAE.load_from_disk`), checked against independent computations."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_image_folder
from sae_lens import SAE
from sae_lens.registry import get_sae_class

from sae_lens_vision_steer.activation_cache import ActivationStore, cache_activations
from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.cli.common import EXIT_USAGE
from sae_lens_vision_steer.core.errors import UnknownNameError, UnsupportedError, UsageError
from sae_lens_vision_steer.data import load_image_dataset
from sae_lens_vision_steer.steering.hooks import check_affine_decoder
from sae_lens_vision_steer.training.trainer import TrainConfig, holdout_split, train_sae
from sae_lens_vision_steer.training.transcoder import paired_batches

RESID, LN2, MLP_OUT = "blocks.1.hook_resid_post", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
ARCHS = ["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "standard", "gated"]
# What SAELens saves each training architecture as (BatchTopK variants become JumpReLU with a threshold).
INFERENCE = {"topk": "topk", "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu", "jumprelu": "jumprelu",
             "standard": "standard", "gated": "gated"}
SMALL = dict(k=4, expansion_factor=2, batch_size=16, show_progress=False, n_checkpoints=0)


@pytest.fixture(scope="module")
def store(tiny_clip, tmp_path_factory) -> ActivationStore:
    root = write_image_folder(tmp_path_factory.mktemp("imgs"), n_classes=3, per_class=16)
    ds = load_image_dataset("imagefolder", None, root, transform=tiny_clip.preprocess)
    return cache_activations(tiny_clip, ds, [RESID, LN2, MLP_OUT], tmp_path_factory.mktemp("store"), dtype="float32",
                             batch_size=64, num_workers=0, show_progress=False)


def heldout_fvu(sae: SAE, store: ActivationStore, hook_in: str, hook_out: str) -> float:
    """Written out: sum ||y - sae(x)||^2 / sum ||y - mean(y)||^2 over the held-out rows."""
    _, held = holdout_split(store, 0.1, 0)
    x, y = store.load(hook_in, rows=held).float(), store.load(hook_out, rows=held).double()
    with torch.no_grad():
        rec = sae.decode(sae.encode(x)).double()
    return float(((y - rec) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_trains_and_plain_sae_lens_loads_it(arch, store, tmp_path):
    res = train_sae(store, RESID, architecture=arch, epochs=1, out_dir=tmp_path / arch, **SMALL)
    sae = SAE.load_from_disk(tmp_path / arch)  # SAELens alone
    assert sae.cfg.architecture() == INFERENCE[arch]
    assert type(sae) is get_sae_class(INFERENCE[arch])[0]
    assert sae.cfg.metadata.objective == arch and sae.cfg.metadata.hook_name == RESID
    assert res.metrics["heldout_fvu"] == pytest.approx(heldout_fvu(sae, store, RESID, RESID), rel=1e-4)
    with torch.no_grad():
        l0 = (sae.encode(store.load(RESID, rows=holdout_split(store, 0.1, 0)[1]).float()) != 0).sum(-1).double().mean()
    assert res.metrics["heldout_mean_l0"] == pytest.approx(float(l0))
    check_affine_decoder(sae)  # steering accepts every one of them


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "gated"])
def test_unit_norm_decoder_and_b_dec_at_the_mean(arch, store, tmp_path):
    # One step at a negligible learning rate: the saved weights are the initial ones.
    train_sae(store, RESID, architecture=arch, total_training_samples=16, lr=1e-12, out_dir=tmp_path / "s", **SMALL)
    sae = SAE.load_from_disk(tmp_path / "s")
    train_rows, _ = holdout_split(store, 0.1, 0)
    mean = store.load(RESID, rows=train_rows).double().mean(0)
    torch.testing.assert_close(sae.b_dec.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.cfg.d_sae), atol=1e-5, rtol=0)


def test_unknown_architecture_refused_with_sae_lens_list():
    with pytest.raises(UnknownNameError) as e:
        TrainConfig(architecture="topkk")
    for name in ARCHS:
        assert repr(name) in str(e.value)


def test_bad_sae_lens_setting_is_a_usage_error(store, tmp_path):
    with pytest.raises(UsageError, match="strictly increasing"):
        train_sae(store, RESID, architecture="matryoshka_batchtopk", sae_cfg_kwargs={"matryoshka_widths": [64, 32]},
                  epochs=1, out_dir=tmp_path / "m", **SMALL)


def test_cli_unknown_architecture_exit_2(store, tmp_path, capsys):
    rc = main(["train", "--cache", str(store.root), "--architecture", "nope", "--out", str(tmp_path / "x")])
    assert rc == EXIT_USAGE
    assert "'jumprelu'" in capsys.readouterr().err


def test_paired_batches_hold_the_same_rows(store, tiny_clip):
    """Row i of the input half and of the output half are the same token: mlp_out == MLP(ln2 output)."""
    mlp = tiny_clip.blocks[1].mlp
    n = 0
    for batch in paired_batches(store, LN2, MLP_OUT, 16, seed=3, epochs=1):
        x_in, x_out = batch[:, :64], batch[:, 64:]
        with torch.no_grad():
            torch.testing.assert_close(mlp(x_in[:, None])[:, 0], x_out, atol=1e-4, rtol=1e-4)
        n += len(batch)
    assert n == (store.n_rows // 16) * 16


def test_transcoder_trains_loads_and_splices(store, tiny_clip, tmp_path):
    res = train_sae(store, LN2, hook_name_out=MLP_OUT, architecture="transcoder", epochs=4,
                    sae_cfg_kwargs={"l1_coefficient": 0.1}, out_dir=tmp_path / "tc", **SMALL)
    tc = SAE.load_from_disk(tmp_path / "tc")
    assert tc.cfg.architecture() == "transcoder" and tc.cfg.d_out == 64
    assert tc.cfg.metadata.hook_name == LN2 and tc.cfg.metadata.hook_name_out == MLP_OUT
    fvu = heldout_fvu(tc, store, LN2, MLP_OUT)
    assert res.metrics["heldout_fvu"] == pytest.approx(fvu, rel=1e-4)
    assert fvu < 1.0  # better than predicting the output hook's mean
    with pytest.raises(UnsupportedError, match="writes another hook"):
        check_affine_decoder(tc)

    # The splice runs it: mlp_out at CLS is the transcoder's output on ln2's CLS output.
    images = torch.randn(3, 3, 32, 32)
    _, clean = tiny_clip.run_with_cache(images, names_filter=[LN2])
    _, cache = tiny_clip.run_with_cache_with_saes(images, saes=[tc], names_filter=[MLP_OUT])
    with torch.no_grad():
        expected = tc(clean[LN2][:, 0])
    torch.testing.assert_close(cache[MLP_OUT][:, 0], expected, atol=1e-5, rtol=1e-5)


def test_transcoder_output_hook_must_exist(store, tiny_clip, tmp_path):
    with pytest.raises(UsageError, match="blocks.1.hook_attn_out"):
        train_sae(store, LN2, hook_name_out="blocks.1.hook_attn_out", architecture="transcoder", epochs=1,
                  out_dir=tmp_path / "a", **SMALL)
    with pytest.raises(UsageError, match="transcoder"):  # a plain SAE with an output hook: refused
        train_sae(store, LN2, hook_name_out=MLP_OUT, architecture="topk", epochs=1, out_dir=tmp_path / "b", **SMALL)
    res = train_sae(store, LN2, hook_name_out=MLP_OUT, architecture="transcoder", epochs=1,
                    out_dir=tmp_path / "c", **SMALL)
    cfg = json.loads((res.out_dir / "cfg.json").read_text())
    cfg["metadata"]["hook_name_out"] = "blocks.7.hook_mlp_out"  # a block this model does not have
    (res.out_dir / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownNameError, match="blocks.7.hook_mlp_out"):
        tiny_clip.add_sae(SAE.load_from_disk(res.out_dir))


def test_cli_trains_a_transcoder(store, tmp_path, capsys):
    rc = main(["train", "--cache", str(store.root), "--hook-in", LN2, "--hook-out", MLP_OUT, "--expansion", "2",
               "--batch-size", "16", "--epochs", "2", "--sae-cfg", "l1_coefficient=0.1", "--n-checkpoints", "0",
               "--no-progress", "--out", str(tmp_path / "tc")])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"{LN2} -> {MLP_OUT}" in out and "transcoder" in out
    assert SAE.load_from_disk(tmp_path / "tc").cfg.metadata.hook_name_out == MLP_OUT


def test_steering_refuses_non_affine_architectures_by_name():
    def make(arch: str, **kw):
        cls, cfg_cls = get_sae_class(arch)
        return cls(cfg_cls(d_in=8, d_sae=16, **kw))

    with pytest.raises(UnsupportedError, match="'skip_transcoder'"):
        check_affine_decoder(make("skip_transcoder", d_out=8, apply_b_dec_to_input=False))
    with pytest.raises(UnsupportedError, match="'matching_pursuit'"):
        check_affine_decoder(make("matching_pursuit", apply_b_dec_to_input=False))
    check_affine_decoder(make("matching_pursuit", apply_b_dec_to_input=True))  # decode = c W_dec + b_dec


def test_cli_missing_output_hook_names_the_flag(store, tmp_path, capsys):
    rc = main(["train", "--cache", str(store.root), "--hook-in", LN2, "--hook-out", "blocks.1.hook_attn_out",
               "--out", str(tmp_path / "x")])
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert "blocks.1.hook_attn_out" in err and "(--hook-out)" in err and MLP_OUT in err
