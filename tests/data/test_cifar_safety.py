"""Issue 19, items 1 and 5: the CIFAR-100 release is a set of pickles. They are read with an unpickler that
resolves only numpy's array constructors, from a folder that holds only the release's files: a payload pickle
in its place is refused, never run."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from saes import payload_pickle

from sae_lens_vision_steer.core.errors import InputError
from sae_lens_vision_steer.data import load_image_dataset


def _release(root, n=4):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(rng.integers(0, 100, n)),
            "filenames": [b"a.png"] * n}
    (d / "test").write_bytes(pickle.dumps(data))
    return d, data


def test_a_payload_in_place_of_a_release_file_is_refused_unrun(tmp_path):
    d, _ = _release(tmp_path)
    marker = tmp_path / "PWNED"
    (d / "train").write_bytes(payload_pickle(marker))
    with pytest.raises(InputError, match=r"train is not a CIFAR-100 release file \(it names io.open"):
        load_image_dataset("cifar100", split="train", data_dir=tmp_path)
    assert not marker.exists()


def test_a_folder_with_other_files_is_refused(tmp_path):
    d, _ = _release(tmp_path)
    (d / "evil.py").write_text("print('hi')")
    with pytest.raises(InputError, match=r"not part of the CIFAR-100 python release \(evil.py\)"):
        load_image_dataset("cifar100", split="test", data_dir=tmp_path)


def test_the_release_layout_still_loads_with_numpy_arrays_and_scalars(tmp_path):
    _, data = _release(tmp_path)
    ds = load_image_dataset("cifar100", split="test", data_dir=tmp_path)
    assert ds.labels.tolist() == [int(v) for v in data["fine_labels"]]  # numpy int64 scalars in the pickle
    np.testing.assert_array_equal(np.asarray(ds.load_image(2))[..., 1], data["data"][2, 1024:2048].reshape(32, 32))
