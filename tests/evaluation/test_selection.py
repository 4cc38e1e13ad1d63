"""The sweep's selection protocol as a library call (evaluation/selection.py): its config is checked up front."""

from __future__ import annotations

import pytest

from sae_lens_vision_steer.core.errors import UsageError
from sae_lens_vision_steer.evaluation.selection import SweepConfig, holdout_split


def test_sweep_config_refuses_bad_grids_and_protocols():
    with pytest.raises(UsageError, match="at least one value"):
        SweepConfig(lams=(), gammas=(1.5,))
    with pytest.raises(UsageError, match="select_on must be one of"):
        SweepConfig(lams=(1.0,), gammas=(1.5,), select_on="test")
    with pytest.raises(UsageError, match="holdout_fraction must be in"):
        SweepConfig(lams=(1.0,), gammas=(1.5,), select_on="train-holdout", holdout_fraction=0)
    assert SweepConfig(lams=(1.0,), gammas=(1.5,), select_on="eval", holdout_fraction=0).select_on == "eval"


def test_holdout_split_keeps_the_fraction_and_refuses_other_classes(tiny_imagenet_dir):
    from sae_lens_vision_steer.data import load_image_dataset

    train = load_image_dataset("tiny-imagenet", "train", tiny_imagenet_dir, limit=400)
    val = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, limit=50)
    held = holdout_split(train, val, 0.1)
    assert len(held) == 40 == round(0.1 * 400)
    val.classnames = list(reversed(val.classnames))
    with pytest.raises(UsageError, match="classes differ"):
        holdout_split(load_image_dataset("tiny-imagenet", "train", tiny_imagenet_dir, limit=400), val, 0.1)
