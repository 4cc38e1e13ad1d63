"""Issue 19, item 12: a pool cache whose label ids mean other classes is refused before oracle and pseudo-label
methods compare them, and a pool of another named data set needs the user to say so."""

from __future__ import annotations

import shutil

import pytest
from conftest import write_image_folder
from saes import make_topk_sae

from sae_lens_vision_steer.core.errors import InputError


@pytest.fixture(scope="module")
def pool_setup(tmp_path_factory, tiny_clip):
    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.data import load_image_dataset

    root = tmp_path_factory.mktemp("pool_labels")
    write_image_folder(root / "data" / "train", n_classes=3, per_class=4, size=32)
    write_image_folder(root / "data" / "val", n_classes=3, per_class=2, size=32, seed=1)
    shutil.copytree(root / "data" / "train", root / "shifted" / "train")
    shutil.rmtree(root / "shifted" / "train" / "class_0")  # one class missing: every later label id shifts
    hook = tiny_clip.steer_hook
    for name in ("data", "shifted"):
        pool = load_image_dataset("imagefolder", "train", root / name, tiny_clip.preprocess)
        cache_activations(tiny_clip, pool, [hook], root / f"pool_{name}", num_workers=0, show_progress=False)
    test = load_image_dataset("imagefolder", "val", root / "data", tiny_clip.preprocess)
    return root, test, make_topk_sae(hook)


def _evaluate(tiny_clip, test, sae, pool, **extra):
    from sae_lens_vision_steer.evaluation import evaluate

    return evaluate(tiny_clip, test, sae, ["clip_steer_oracle"], num_workers=0, show_progress=False,
                    options={"pool_cache": str(pool), "n_neighbours": 3, **extra})


def test_a_pool_whose_class_ids_are_shifted_is_refused(pool_setup, tiny_clip):
    root, test, sae = pool_setup
    assert _evaluate(tiny_clip, test, sae, root / "pool_data").methods["clip_steer_oracle"].top1 >= 0
    with pytest.raises(InputError, match=r"other class ids than the evaluation \(2 vs 3 classes; class 0 is "
                                         r"'class 1' in the pool, 'class 0' here\)"):
        _evaluate(tiny_clip, test, sae, root / "pool_shifted")
    with pytest.raises(InputError, match="other class ids"):  # naming another pool on purpose keeps the class check
        _evaluate(tiny_clip, test, sae, root / "pool_shifted", pool_other_dataset=True)


def test_a_named_data_set_pool_of_another_data_set_needs_the_flag(pool_setup, tiny_clip):
    from sae_lens_vision_steer.evaluation.methods.pool import check_pool_labels

    root, test, _ = pool_setup

    class Named:  # the evaluation's classes under a registry name
        dataset_id, classnames = "cifar100", test.classnames

    class Cache:
        root = "POOL"

    req = {"dataset": "tiny-imagenet", "classnames": list(test.classnames)}
    with pytest.raises(InputError, match="holds data set 'tiny-imagenet', the evaluation 'cifar100'"):
        check_pool_labels(Cache, req, Named)
    check_pool_labels(Cache, req, Named, other_dataset=True)  # on purpose, same classes: accepted
