import numpy as np
import torch
import torch.nn.functional as F

from sae_lens_vision_steer import (
    ZeroShotClassifier,
    accuracy_metrics,
    load_image_dataset,
)


def test_class_weights_follow_clip_recipe(tiny_clip):
    names, templates = ["cat", "dog", "owl"], ["a photo of a {}.", "a drawing of a {}."]
    clf = ZeroShotClassifier(tiny_clip, names, templates, show_progress=False)
    with torch.no_grad():
        for c, name in enumerate(names):
            e = tiny_clip.clip.encode_text(tiny_clip.tokenize([t.format(name) for t in templates]))
            expected = F.normalize(F.normalize(e, dim=-1).mean(0), dim=0)
            torch.testing.assert_close(clf.weights_EC[:, c], expected, atol=1e-6, rtol=0)
    embeds = torch.randn(4, 32)
    expected_logits = tiny_clip.clip.logit_scale.exp() * F.normalize(embeds, dim=-1) @ clf.weights_EC
    torch.testing.assert_close(clf.logits(embeds), expected_logits.detach())


def test_accuracy_metrics_by_hand():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 5, 4, 3, 2, 1], [0, 1, 2, 3, 4, 5], [5, 0, 1, 2, 3, 4]])
    labels = torch.tensor([0, 2, 0, 0])
    r = accuracy_metrics(logits, labels)
    assert r.predictions.tolist() == [0, 1, 5, 0]
    assert r.top1 == 50.0  # samples 0 and 3
    assert r.top5 == 75.0  # sample 2 has label 0 ranked last
    # class 0: 2 of 3 correct, class 2: 0 of 1; other classes absent (NaN)
    np.testing.assert_allclose(r.per_class_acc[[0, 2]], [200 / 3, 0.0])
    assert np.isnan(r.per_class_acc[1]) and abs(r.mean_per_class - 100 / 3) < 1e-9


def test_evaluate_on_real_images(tiny_clip, tiny_imagenet_dir):
    ds = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=200)
    clf = ZeroShotClassifier(tiny_clip, ds.classnames, "single", show_progress=False)
    res = clf.evaluate(tiny_clip, ds, batch_size=64, num_workers=0, show_progress=False)
    assert res.n_images == 200
    # independent path: open_clip's own encode_image on the same images
    images = torch.stack([ds[i][0] for i in range(200)])
    with torch.no_grad():
        pred = clf.logits(tiny_clip.clip.encode_image(images)).argmax(-1).numpy()
    np.testing.assert_array_equal(res.predictions, pred)
    assert abs(res.top1 - 100 * np.mean(pred == ds.subset_labels)) < 1e-4
