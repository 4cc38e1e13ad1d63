"""PASS: the prototype loss, label routing through SAELens' trainer, saving as a plain top-k SAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import SAE, SAETrainer, TopKSAE, TrainingSAE
from sae_lens.config import SAETrainerConfig

from sae_lens_vision_steer.training.pass_sae import (
    LabelRoutingProvider,
    PassTrainingSAE,
    PassTrainingSAEConfig,
    PassTrainStepInput,
    check_pass_labels,
    prototype_distance,
)


def make_pass_sae(d_in: int = 6, d_sae: int = 24, k: int = 3, n_classes: int = 3, w_aux: float = 0.8,
                  momentum: float = 0.9, seed: int = 0) -> PassTrainingSAE:
    torch.manual_seed(seed)
    return PassTrainingSAE(PassTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, n_classes=n_classes, w_aux=w_aux,
                                                 prototype_momentum=momentum))


def step_input(x: torch.Tensor, labels: torch.Tensor | None) -> PassTrainStepInput:
    return PassTrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                              is_logging_step=False, labels=labels)


def test_prototype_loss_is_w_aux_times_distance_to_ema_class_means() -> None:
    sae = make_pass_sae(w_aux=0.8, momentum=0.75)
    g = torch.Generator().manual_seed(1)
    x1, y1 = torch.randn(10, 6, generator=g), torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0, 1])  # class 2 absent
    out1 = sae.training_forward_pass(step_input(x1, y1))
    z1 = out1.feature_acts.detach()
    proto = torch.zeros(3, 24)
    for c in (0, 1):  # first sighting: the prototype is the batch's class mean
        proto[c] = z1[y1 == c].mean(0)
    expected1 = 0.8 * ((z1 - proto[y1]) ** 2).sum(1).mean()
    torch.testing.assert_close(out1.losses["pass_prototype_loss"], expected1)
    torch.testing.assert_close(sae.prototypes_CS, proto)
    assert sae.prototype_seen_C.tolist() == [True, True, False]
    # Total = MSE + dead-latent aux + PASS (SAELens' sum of the losses dict).
    torch.testing.assert_close(out1.loss, sum(out1.losses.values()))

    x2, y2 = torch.randn(6, 6, generator=g), torch.tensor([2, 2, 1, 1, 2, 1])  # class 0 absent, 2 new
    out2 = sae.training_forward_pass(step_input(x2, y2))
    z2 = out2.feature_acts.detach()
    proto[1] = 0.75 * proto[1] + 0.25 * z2[y2 == 1].mean(0)
    proto[2] = z2[y2 == 2].mean(0)
    torch.testing.assert_close(sae.prototypes_CS, proto)
    torch.testing.assert_close(out2.losses["pass_prototype_loss"], 0.8 * ((z2 - proto[y2]) ** 2).sum(1).mean())
    # The gradient of the PASS term flows through the codes only (prototypes are buffers).
    assert not sae.prototypes_CS.requires_grad


def test_labels_missing_misaligned_or_unknown_fail_clearly() -> None:
    sae = make_pass_sae()
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="needs class labels"):
        sae.training_forward_pass(step_input(x, None))
    with pytest.raises(RuntimeError, match="for a batch of 4"):
        sae.training_forward_pass(step_input(x, torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match="-1 marks"):
        sae.training_forward_pass(step_input(x, torch.tensor([0, 1, -1, 2])))
    with pytest.raises(ValueError, match="2 of 5 cached rows have no label"):
        check_pass_labels(np.array([0, -1, 3, -1, 1]))
    assert check_pass_labels(np.array([0, 2, 1])) == 3
    with pytest.raises(ValueError, match="n_classes"):
        PassTrainingSAEConfig(d_in=4, d_sae=8, k=2, n_classes=0)


def _labelled_batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            yield x[perm[i:i + batch]], y[perm[i:i + batch]]


def test_trainer_routes_labels_and_saves_a_plain_topk_sae(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 6, generator=g)
    y = torch.randint(0, 4, (512,), generator=g)
    x = centres[y] + torch.randn(512, 6, generator=g)
    sae = make_pass_sae(n_classes=4)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    used: list[tuple[torch.Tensor, torch.Tensor]] = []
    batches = _labelled_batches(x, y, 64, seed=1)

    def spy():  # what the provider handed out
        for xb, yb in batches:
            seen.append((xb, yb))
            yield xb, yb

    original_update = sae.update_prototypes

    def recording_update(codes_BS, labels_B):  # what the loss actually paired
        used.append((codes_BS.detach().clone(), labels_B.clone()))
        original_update(codes_BS, labels_B)

    sae.update_prototypes = recording_update  # type: ignore[method-assign]

    cfg = SAETrainerConfig(total_training_samples=64 * 12, train_batch_size_samples=64, lr=1e-3, lr_end=1e-3)
    trainer = SAETrainer(cfg, sae, LabelRoutingProvider(spy(), sae))
    trainer.fit()
    assert len(seen) == 12 and len(used) == 12 and bool(sae.prototype_seen_C.all())
    for (xb, yb), (_, yu) in zip(seen, used):  # every step's labels belong to that step's activations
        assert torch.equal(yb, yu)
    # ... and the codes of the last step are the codes of the last batch's activations.
    del sae.update_prototypes
    torch.testing.assert_close(used[-1][0], sae.encode(seen[-1][0]).detach(), rtol=0.2, atol=0.05)
    assert sae._step_labels is None  # consumed

    sae.save_inference_model(tmp_path / "inf")
    loaded = SAE.load_from_disk(tmp_path / "inf")
    assert isinstance(loaded, TopKSAE) and loaded.cfg.architecture() == "topk"
    assert loaded.cfg.metadata.objective == "pass" and loaded.cfg.metadata.w_aux == pytest.approx(0.8)
    assert "prototypes_CS" not in dict(loaded.named_buffers())
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-4, atol=1e-5)

    # A training checkpoint keeps the prototypes, so a resumed run continues from them.
    sae.save_model(tmp_path / "ckpt")
    resumed = TrainingSAE.load_from_disk(tmp_path / "ckpt")
    assert isinstance(resumed, PassTrainingSAE)
    torch.testing.assert_close(resumed.prototypes_CS, sae.prototypes_CS)
    assert resumed.cfg.w_aux == pytest.approx(0.8) and resumed.cfg.n_classes == 4


def test_provider_rejects_unlabelled_batches() -> None:
    sae = make_pass_sae()
    with pytest.raises(TypeError, match="labels mode"):
        next(LabelRoutingProvider(iter([torch.randn(4, 6)]), sae))
    with pytest.raises(ValueError, match="4 activations but 3 labels"):
        next(LabelRoutingProvider(iter([(torch.randn(4, 6), torch.tensor([0, 1, 2]))]), sae))


def test_prototype_distance_metric() -> None:
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    y = torch.tensor([0, 0, 1, 1])
    d = prototype_distance(z, y)
    # class means (2, 0) and (0, 3): each point is 1 away -> 1; global mean (1, 1.5)
    assert d["mean_sq_dist"] == pytest.approx(1.0)
    total = np.mean([(1 - 1) ** 2 + 1.5**2, 2**2 + 1.5**2, 1 + 0.5**2, 1 + 2.5**2])
    assert d["within_class_fraction"] == pytest.approx(1.0 / total)


# ------------------------------------------------------------------------------------------ through train_sae
@pytest.fixture(scope="module")
def tiny_imagenet_cache(tmp_path_factory, tiny_imagenet_dir):
    """Tiny CLIP (random weights) CLS activations of the first 10 Tiny-ImageNet classes (1,000 images)."""
    from conftest import make_tiny_clip

    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.data import load_image_dataset

    model = make_tiny_clip()
    ds = load_image_dataset("tiny-imagenet", "train", data_dir=tiny_imagenet_dir, transform=model.preprocess)
    ds.indices = np.arange(1000)  # the train split is class-major: 10 classes x 100 images
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    root = tmp_path_factory.mktemp("pass_cache")
    cache_activations(model, ds, [hook], root / "cache", dtype="float32", num_workers=0, show_progress=False)
    return root / "cache", hook


def test_pass_pulls_heldout_codes_to_class_prototypes_vs_plain_topk(tiny_imagenet_cache, tmp_path) -> None:
    from sae_lens_vision_steer.training.pass_sae import (
        prototype_distance_on_cache,
        train_pass_sae,
    )
    from sae_lens_vision_steer.training.trainer import holdout_split, train_sae

    cache_dir, hook = tiny_imagenet_cache
    kw = dict(k=8, expansion_factor=4, epochs=12, batch_size=128, seed=0, n_checkpoints=0, show_progress=False)
    plain = train_sae(cache_dir, hook, out_dir=tmp_path / "plain", **kw)
    pas = train_pass_sae(cache_dir, hook, out_dir=tmp_path / "pass", w_aux=0.8, **kw)
    train_rows, heldout_rows = holdout_split(cache_dir, 0.1, 0)  # train_sae's default held-out images
    d_plain = prototype_distance_on_cache(plain.sae, cache_dir, heldout_rows, train_rows)
    d_pass = prototype_distance_on_cache(pas.sae, cache_dir, heldout_rows, train_rows)
    # Held-out codes sit closer to their class prototypes (class-mean codes of the training rows).
    assert d_pass["mean_sq_dist"] < 0.85 * d_plain["mean_sq_dist"], (d_plain, d_pass)
    # The price is reconstruction, as in the paper's w_aux trade-off.
    assert pas.metrics["heldout_fvu"] > plain.metrics["heldout_fvu"]

    # Saved as an ordinary top-k SAE that SAELens loads on its own, with the PASS metadata.
    loaded = SAE.load_from_disk(tmp_path / "pass")
    assert isinstance(loaded, TopKSAE) and loaded.cfg.architecture() == "topk"
    meta = loaded.cfg.metadata
    assert meta.objective == "pass" and meta.w_aux == pytest.approx(0.8) and meta.hook_name == hook
    assert plain.sae.cfg.metadata.objective == "topk"
    x = torch.randn(5, loaded.cfg.d_in)
    torch.testing.assert_close(loaded.encode(x), pas.sae.encode(x))


def test_pass_refuses_unlabelled_images_before_training(tmp_path, tiny_clip) -> None:
    from conftest import write_image_folder

    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.data import load_image_dataset
    from sae_lens_vision_steer.training.pass_sae import train_pass_sae

    ds = load_image_dataset("imagefolder", data_dir=write_image_folder(tmp_path / "img", 2, 4),
                            transform=tiny_clip.preprocess)
    ds.labels = ds.labels.copy()
    ds.labels[[2, 5]] = -1  # two images without a label
    hook = f"blocks.{tiny_clip.cfg.n_layers - 1}.hook_resid_post"
    cache_activations(tiny_clip, ds, [hook], tmp_path / "cache", num_workers=0, show_progress=False)
    with pytest.raises(ValueError, match="2 of 8 cached rows have no label"):
        train_pass_sae(tmp_path / "cache", hook, out_dir=tmp_path / "sae", epochs=1, batch_size=4)
    assert not (tmp_path / "sae").exists()  # refused before anything was written


def test_cli_train_objective_pass(tiny_imagenet_cache, tmp_path, capsys) -> None:
    from sae_lens_vision_steer.cli import main

    cache_dir, hook = tiny_imagenet_cache
    out = tmp_path / "sae"
    assert main(["train", "--cache", str(cache_dir), "--objective", "pass", "--w-aux", "0.5", "--k", "4",
                 "--expansion", "2", "--epochs", "1", "--batch-size", "128", "--n-checkpoints", "0", "--no-progress",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert "objective pass (w_aux 0.5)" in capsys.readouterr().out
    sae = SAE.load_from_disk(out)
    assert sae.cfg.architecture() == "topk" and sae.cfg.metadata.objective == "pass" and sae.cfg.metadata.w_aux == 0.5


def test_pass_sizes_prototypes_by_the_class_count_not_the_largest_label(tmp_path, tiny_clip) -> None:
    """A label far outside the data set's classes (issue 19, item 10) is refused before training, naming the
    label and its row; it never sizes the prototypes (5,000,000 once allocated 5.1 GB)."""
    from conftest import write_image_folder

    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.data import load_image_dataset
    from sae_lens_vision_steer.training.pass_sae import train_pass_sae

    ds = load_image_dataset("imagefolder", data_dir=write_image_folder(tmp_path / "img", 2, 4),
                            transform=tiny_clip.preprocess)
    ds.labels = ds.labels.copy()
    ds.labels[6] = 5_000  # e.g. a stream label before streams were checked
    hook = f"blocks.{tiny_clip.cfg.n_layers - 1}.hook_resid_post"
    cache = cache_activations(tiny_clip, ds, [hook], tmp_path / "cache", num_workers=0, show_progress=False)
    assert cache.metadata["request"]["n_classes"] == 2  # the cache records the data set's class count
    with pytest.raises(ValueError, match=r"1 of 8 cached rows have a label outside \[0, 2\), the 2 classes of the "
                                         r"data set: first label 5000 at row 6"):
        train_pass_sae(tmp_path / "cache", hook, out_dir=tmp_path / "sae", epochs=1, batch_size=4)
    assert not (tmp_path / "sae").exists()
    # The count comes from the data set, not from the labels seen: classes without rows get a prototype row
    assert check_pass_labels(np.array([0, 1, 1]), n_classes=5) == 5
    # Without a recorded count, a label no cache of that size can need is refused (no allocation)
    with pytest.raises(ValueError, match=r"first label 5000000 at row 1"):
        check_pass_labels(np.array([0, 5_000_000, 1]))
    with pytest.raises(ValueError, match=r"first label -3 at row 0"):  # not "no label" (-1 is that)
        check_pass_labels(np.array([-3, 1, 0]), n_classes=2)
