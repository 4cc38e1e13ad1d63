"""The one positions vocabulary (core/positions.py): names, index lists, register tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sae_lens_vision_steer.core.errors import UsageError
from sae_lens_vision_steer.core.positions import (
    check_positions,
    position_index,
    positions_label,
    select_positions,
    seqpos_slice,
    token_set,
)
from sae_lens_vision_steer.sae.metadata import training_metadata


def test_register_tokens_are_not_patches():
    # a DINOv2-with-registers layout: CLS + 4 registers + 16 patches
    cfg = SimpleNamespace(n_prefix_tokens=5, has_cls_token=True, model_name="x", pooling="cls")
    assert position_index(cfg, "patches") == slice(5, None)
    assert token_set("patches", 21, 5) == set(range(5, 21))
    assert seqpos_slice("patches", 5) == [5, None] and seqpos_slice("cls", 5) == [0, 1]
    act = torch.arange(2 * 21 * 3, dtype=torch.float32).reshape(2, 21, 3)
    rows = select_positions(act, "patches", 5)
    assert rows.shape == (2 * 16, 3) and torch.equal(rows[0], act[0, 5])


def test_sae_metadata_records_the_slice_after_the_register_tokens():
    request = {"positions": "patches", "dataset": "d", "split": "train", "model_name": "m",
               "model_config": {"n_tokens": 21, "n_prefix_tokens": 5}}
    meta = training_metadata(request, "blocks.0.hook_resid_post", "topk", [0.0])
    assert meta["seqpos_slice"] == [5, None]  # was [1, None]: the register tokens counted as patches


def test_names_and_index_lists():
    assert check_positions("cls") == "cls" and check_positions([0, 3]) == (0, 3)
    assert positions_label([0]) == "cls" and positions_label([2, 3]) == "patches" and positions_label([0, 2]) == "all"
    assert token_set([-1], 10) == {9}
    for bad in ("tokens", [], [True], ["1"]):
        with pytest.raises(UsageError):
            check_positions(bad)
