"""Files are files (issue 19, items 14 and 16): a FIFO named like an image is refused (or skipped and counted)
before it is read, never waited on; a file name that is not valid UTF-8 is refused naming the file."""

from __future__ import annotations

import os
import threading

import pytest
from conftest import write_image_folder

from sae_lens_vision_steer.activation_cache import cache_activations
from sae_lens_vision_steer.core.errors import InputError
from sae_lens_vision_steer.data import load_image_dataset
from sae_lens_vision_steer.data.base import BadImageError

HOOK = "blocks.0.hook_resid_post"


def _read_with_deadline(ds, i: int, fifo, seconds: float = 20) -> dict:
    """`ds[i]` in a thread. If it is still blocked after `seconds` (waiting for a writer on the FIFO), the
    FIFO's write end is opened and closed, which ends the read, and the test fails."""
    out: dict = {}

    def read():
        try:
            out["value"] = ds[i]
        except BadImageError as e:
            out["error"] = str(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader gets its writer, then EOF
        t.join(10)
        pytest.fail(f"reading {fifo} blocked for {seconds} s")
    return out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_named_like_an_image_is_refused_before_it_is_read(tiny_clip, tmp_path):
    root = write_image_folder(tmp_path / "images", n_classes=2, per_class=3, size=32)
    fifo = root / "class_1" / "x.jpg"
    os.mkfifo(fifo)
    ds = load_image_dataset("imagefolder", "all", root, transform=tiny_clip.preprocess)
    i = ds.paths.index(fifo)  # it is listed as an image ...
    out = _read_with_deadline(ds, i, fifo)
    assert out == {"error": f"cannot read image {fifo}: it is a FIFO (named pipe), not a regular file"}  # ... not read
    ds.skip_bad_images = True
    assert _read_with_deadline(ds, i, fifo) == {"value": None}
    # a cache skips and counts it (the reading happens in the cache's own loop)
    cache = cache_activations(tiny_clip, ds, HOOK, tmp_path / "cache", batch_size=4, num_workers=0,
                              show_progress=False)
    assert cache.metadata["n_images_skipped"] == 1 and cache.n_rows == 6
    assert i not in set(cache.image_index.tolist())


def test_a_file_name_that_is_not_utf8_is_named(tmp_path):
    root = write_image_folder(tmp_path / "images", n_classes=2, per_class=2, size=32)
    odd = os.fsencode(root / "class_0") + b"/caf\xe9.png"  # Latin-1 bytes, as an old archive may hold
    with open(odd, "wb") as f:
        f.write((root / "class_0" / "0.png").read_bytes())
    with pytest.raises(InputError, match=r"the file name .*/class_0/caf\\xe9\.png is not valid UTF-8; rename it"):
        load_image_dataset("imagefolder", "all", root)
    os.remove(odd)
    os.mkdir(os.fsencode(root) + b"/cl\xe4ss")  # a class folder (no images in it: a class of its own)
    with pytest.raises(InputError, match=r"the class folder name .*/cl\\xe4ss is not valid UTF-8"):
        load_image_dataset("imagefolder", "all", root)
