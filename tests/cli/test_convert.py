"""`vision-steer convert`: another library's SAE written as a SAELens folder that plain SAELens and `--sae` of
every command read; the model card `publish` writes credits the library."""

from __future__ import annotations

import torch
from sae_lens import SAE
from saes import write_sparsify

from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.cli.common import EXIT_INPUT, EXIT_USAGE
from sae_lens_vision_steer.hub.model_card import sae_card_section
from sae_lens_vision_steer.sae.loading import load_vision_sae


def test_convert_then_load_and_credit(tmp_path, capsys):
    write_sparsify(tmp_path / "run" / "vision_model.encoder.layers.1")
    out = tmp_path / "sae"
    rc = main(["convert", "--source", str(tmp_path / "run"), "--out", str(out), "--model", "ViT-B-32",
               "--pretrained", "openai", "--positions", "cls"])
    assert rc == 0, capsys.readouterr().err
    assert "sparsify SAE -> SAELens topk SAE, d_in 64, d_sae 128, k 4" in capsys.readouterr().out
    imported, _ = load_vision_sae(tmp_path / "run")
    plain = SAE.load_from_disk(out)  # plain SAELens reads the converted folder
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(plain.encode(x), imported.encode(x))
    assert plain.cfg.metadata.hook_name == "blocks.1.hook_resid_post" and plain.cfg.metadata.positions == "cls"
    assert plain.cfg.metadata.source["library"] == "eai-sparsify"

    # the card `publish` writes credits the library
    card = sae_card_section("someone/vision-saes", "sparsify-layer1", {"d_in": 64, "d_sae": 128, "k": 4,
                            "architecture": "topk"}, dict(plain.cfg.metadata.items()))
    assert ("| Trained with | eai-sparsify (imported from its `sparsify` files, "
            "`vision_model.encoder.layers.1/sae.safetensors`) |") in card

    assert main(["convert", "--source", str(tmp_path / "run"), "--out", str(out)]) == EXIT_USAGE  # not empty
    err = capsys.readouterr().err
    assert "out_dir (--out)" in err and "exists and is not empty" in err
    write_sparsify(tmp_path / "embed" / "model.embed")  # a hookpoint that names no block: the hook is asked for
    rc = main(["convert", "--source", str(tmp_path / "embed" / "model.embed"), "--out", str(tmp_path / "o")])
    assert rc == EXIT_USAGE
    assert "pass hook_name (--hook)" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "sae.pt").write_bytes(b"not a checkpoint")
    rc = main(["convert", "--source", str(tmp_path / "junk" / "sae.pt"), "--format", "overcomplete",
               "--constructor", '{"class": "TopKSAE", "input_shape": 64, "nb_concepts": 128}',
               "--hook", "blocks.1.hook_resid_post", "--out", str(tmp_path / "o2")])
    assert rc == EXIT_INPUT and "cannot be read as a torch file" in capsys.readouterr().err


def test_the_help_lists_every_format():
    from sae_lens_vision_steer.cli.convert import FORMATS
    from sae_lens_vision_steer.sae import formats

    assert FORMATS.split(", ") == ["auto", *formats.FORMATS]
