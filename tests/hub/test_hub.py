"""Publishing SAEs to the Hub and loading them back. No network: the dry-run folder is checked directly,
and uploads run with only the `HfApi` network calls replaced (asserting on the commit they receive)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml
from conftest import make_tiny_clip
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image
from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import save_file

from sae_lens_vision_steer import HookedCLIP
from sae_lens_vision_steer.cli import build_parser, main
from sae_lens_vision_steer.cli.common import EXIT_CONFLICT, EXIT_INPUT, EXIT_USAGE  # noqa: F401
from sae_lens_vision_steer.hub.model_card import card_sections, merge_model_card
from sae_lens_vision_steer.hub.publish import publish_sae
from sae_lens_vision_steer.sae.loading import load_vision_sae, log_feature_sparsity

REPO = "me/vit-saes"
SAE_ID = "blocks.1.hook_resid_post"
HOOK = "blocks.1.hook_resid_post"
META = dict(hook_name=HOOK, model_name="ViT-B-32", pretrained="openai", positions="cls", dataset="tiny-imagenet",
            split="train", n_training_samples=20000, heldout_fvu=0.31234, mean_l0=7.5, dead_fraction=0.0234,
            objective="topk")
RESULTS = {  # the shape `vision-steer eval` writes (see also test_card_from_real_eval_results)
    "config": {"model": "ViT-B-32", "pretrained": "openai", "dataset": "tiny-imagenet", "split": "val",
               "n_images": 10000, "hook_name": HOOK, "lam": 2.1, "gamma": 1.5, "fvu_threshold": None,
               "templates": "imagenet", "methods": ["zeroshot", "vs2"], "sae_path": "/home/me/runs/sae",
               "random_weights": False, "seed": 0,
               "sae": {"architecture": "topk", "d_in": 64, "d_sae": 128, "k": 8, "hook_name": HOOK,
                       "dataset": "tiny-imagenet", "heldout_fvu": 0.31234}},
    "methods": {
        "zeroshot": {"top1": 55.123, "top5": 80.2, "mean_per_class": 54.9, "delta_top1": None, "coverage": None,
                     "per_class_acc": [50.0, 60.0]},
        "vs2": {"top1": 57.3, "top5": 81.04, "mean_per_class": 56.0, "delta_top1": 2.177, "coverage": 0.95,
                "per_class_acc": [55.0, 60.0]},
    },
    "classnames": ["a", "b"],
    "timing": {"seconds": 1.0},
}


def make_sae_folder(path: Path, seed: int = 0, d_in: int = 64, d_sae: int = 128, k: int = 8, sparsity: bool = True,
                    **meta) -> TopKTrainingSAE:
    """A random top-k SAE saved the way training does: `save_inference_model` + `sparsity.safetensors`."""
    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(**{**META, **meta}))
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():  # non-zero biases so a lost tensor would show in the reconstruction
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    sae.save_inference_model(path)
    if sparsity:
        save_file({"sparsity": torch.linspace(-5, -1, d_sae)}, path / "sparsity.safetensors")
    return sae


def reconstruct(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sae.decode(sae.encode(x))


@pytest.fixture()
def sae_dir(tmp_path) -> Path:
    d = tmp_path / "run" / "sae"
    make_sae_folder(d)
    return d


@pytest.fixture()
def dry_run(sae_dir, tmp_path) -> Path:
    (sae_dir.parent / "results.json").write_text(json.dumps(RESULTS))  # found next to the SAE folder
    res = publish_sae(sae_dir, REPO, SAE_ID, dry_run_dir=tmp_path / "out")
    assert res.eval_results == sae_dir.parent / "results.json"
    return res.dry_run_dir


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.DOTALL)


# ------------------------------------------------------------------------------------------ dry run
def test_dry_run_writes_hub_layout_that_loads_identically(sae_dir, dry_run, tmp_path):
    files = sorted(p.relative_to(dry_run).as_posix() for p in dry_run.rglob("*") if p.is_file())
    assert files == ["README.md", f"{SAE_ID}/cfg.json", f"{SAE_ID}/sae_weights.safetensors",
                     f"{SAE_ID}/sparsity.safetensors"]
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert (dry_run / SAE_ID / name).read_bytes() == (sae_dir / name).read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging leftovers

    original = SAE.load_from_disk(sae_dir)
    published = SAE.load_from_disk(dry_run / SAE_ID)
    x = torch.randn(16, 64)
    assert torch.equal(reconstruct(published, x), reconstruct(original, x))
    # independent of SAELens' encode: top-k of the pre-activations, then the affine decoder
    pre = (x - published.b_dec) @ published.W_enc + published.b_enc
    top = pre.topk(8, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(reconstruct(published, x), codes @ published.W_dec + published.b_dec)


def test_dry_run_refuses_a_non_empty_folder_and_changes_nothing(sae_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        publish_sae(sae_dir, REPO, SAE_ID, dry_run_dir=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # an existing empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert publish_sae(sae_dir, REPO, SAE_ID, dry_run_dir=empty, eval_results=False).dry_run_dir == empty
    assert (empty / SAE_ID / "cfg.json").is_file()


# ------------------------------------------------------------------------------------------ model card
def test_card_gives_the_figures_and_valid_tables(dry_run):
    card = (dry_run / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "saelens" and "sparse-autoencoder" in front["tags"]
    for text in ("`ViT-B-32`", "pretrained `openai`", f"`{HOOK}`", "| Positions | `cls` |",
                 "| d_in / d_sae / k | 64 / 128 / 8 |", "`tiny-imagenet`, split `train`", "| 20,000 |",
                 "| 0.3123 |", "| 7.50 |", "0.0234 (2.34% of latents)"):
        assert text in card, text

    markdown_it = pytest.importorskip("markdown_it")
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(card)
    assert sum(t.type == "table_open" for t in tokens) == 2  # facts + accuracy
    # every row of every table has as many cells as its header
    lines = card.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and re.fullmatch(r"\|(-+:?\|)+", lines[i + 1] if i + 1 < len(lines) else ""):
            width = line.count("|")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].replace("\\|", "").count("|") == width, lines[j]
                j += 1
    acc = {row[0]: row[1:] for row in
           ([c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| zeroshot")
            or line.startswith("| vs2"))}
    for name, m in RESULTS["methods"].items():
        expect = [f"{m['top1']:.2f}", f"{m['top5']:.2f}", f"{m['mean_per_class']:.2f}",
                  "—" if m["delta_top1"] is None else f"{m['delta_top1']:+.2f}",
                  "—" if m["coverage"] is None else f"{100 * m['coverage']:.1f}%"]
        assert acc[name] == expect
    assert "55.12" in card and "+2.18" in card and "95.0%" in card
    assert "`dataset=tiny-imagenet`, `split=val`, `n_images=10000`" in card
    assert "/home/me" not in card  # local paths from the eval config stay out of a public card


def test_card_plain_saelens_code_loads_through_the_hub_loader(dry_run, sae_dir, monkeypatch):
    """The card's `SAE.from_pretrained(repo_id, sae_id)` runs verbatim; only `hf_hub_download` (the
    network boundary of SAELens' Hub loader) is replaced, serving the dry-run files."""
    import sae_lens.loading.pretrained_sae_loaders as loaders

    requested = []

    def fake_hf_hub_download(repo_id, filename, force_download=False, **kwargs):
        assert repo_id == REPO
        requested.append(filename)
        path = dry_run / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(loaders, "hf_hub_download", fake_hf_hub_download)
    card = (dry_run / "README.md").read_text()
    [code] = [b for b in python_blocks(card) if "from sae_lens import SAE" in b]
    ns: dict = {}
    exec(code, ns)
    assert sorted(requested) == sorted(f"{SAE_ID}/{n}" for n in ("cfg.json", "sae_weights.safetensors",
                                                                   "sparsity.safetensors"))
    x = torch.randn(8, 64)
    assert torch.equal(reconstruct(ns["sae"], x), reconstruct(SAE.load_from_disk(sae_dir), x))
    assert ns["sae"].cfg.metadata.hook_name == HOOK
    # SAELens returns the sparsity it finds on the Hub
    _, _, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(REPO, SAE_ID)
    torch.testing.assert_close(sparsity, torch.linspace(-5, -1, 128))


def test_card_load_and_steer_code_runs_and_steers_as_vs2(dry_run, tmp_path, monkeypatch):
    """The card's steering example, with the repo id replaced by the dry-run folder and the image by a
    generated one; `HookedCLIP.from_pretrained` (which would download weights) returns a tiny CLIP."""
    pytest.importorskip("sae_lens_vision_steer.steering")
    tiny = make_tiny_clip(seed=1)
    calls = []

    def fake_from_pretrained(name, pretrained=None, **kwargs):
        calls.append((name, pretrained))
        return tiny

    monkeypatch.setattr(HookedCLIP, "from_pretrained", staticmethod(fake_from_pretrained))
    image_path = tmp_path / "img.png"
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(image_path)
    card = (dry_run / "README.md").read_text()
    [code] = [b for b in python_blocks(card) if "VS2Steering" in b]
    assert f'load_vision_sae("{REPO}", "{SAE_ID}")' in code
    code = code.replace(json.dumps(REPO), json.dumps(str(dry_run))).replace('"image.jpg"', json.dumps(str(image_path)))
    ns: dict = {}
    exec(code, ns)
    assert calls == [("ViT-B-32", "openai")]  # the model named in the SAE's metadata
    assert ns["info"].hook_name == HOOK and ns["info"].sae_id == SAE_ID

    # VS2 written out (paper Eq. 2) on the CLS token of the hooked block, then the CLIP head
    sae, model, clf = ns["sae"], ns["model"], ns["classifier"]
    lam, gamma = 2.1, 1.5
    with torch.no_grad():
        _, cache = model.run_with_cache(ns["image"], names_filter=[HOOK])
        x = cache[HOOK][:, 0]
        v = (gamma - 1) * sae.encode(x) @ sae.W_dec
        x_hat = (x + lam * v) * x.norm(dim=-1, keepdim=True) / (x + lam * v).norm(dim=-1, keepdim=True)
        expected = clf.logits(model.head(x_hat))
        plain = clf.logits(model.encode_image(ns["image"]))
    torch.testing.assert_close(ns["steered"], expected)
    torch.testing.assert_close(ns["plain"], plain)
    assert not torch.allclose(ns["steered"], ns["plain"])


def test_card_code_runs_for_a_local_dir_model_on_any_path_to_it(tmp_path, monkeypatch):
    """Issue 22: an SAE of a `local-dir:` model is published as `local-dir:<folder name>`; the card's code,
    pointed at wherever the user keeps that folder (as its comment invites), loads and steers unrefused."""
    import shutil

    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_lens_vision_steer.core.identity import model_identity
    from sae_lens_vision_steer.sae.metadata import training_metadata

    asset = Path(__file__).resolve().parents[2] / "assets" / "tiny-clip-tinyimagenet"
    mine = tmp_path / "main" / "assets" / asset.name
    shutil.copytree(asset, mine, ignore=shutil.ignore_patterns("*.md", "training.json"))
    monkeypatch.chdir(tmp_path / "main")
    model = HookedCLIP.from_pretrained("local-dir:assets/tiny-clip-tinyimagenet")
    hook = model.steer_hook
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=128, d_sae=256, k=8))
    request = {**model_identity(model), "positions": "cls", "dataset": "tiny-imagenet", "split": "train"}
    for key, value in training_metadata(request, hook, "topk", [0.0] * 128).items():
        setattr(sae.cfg.metadata, key, value)
    sae.save_model(str(tmp_path / "main" / "runs" / "sae"))
    res = publish_sae(tmp_path / "main" / "runs" / "sae", REPO, hook, dry_run_dir=tmp_path / "out",
                      eval_results=False)
    card = (res.dry_run_dir / "README.md").read_text()
    [code] = [b for b in python_blocks(card) if "VS2Steering" in b]
    assert 'HookedCLIP.from_pretrained("local-dir:tiny-clip-tinyimagenet"' in code and "any path" in code
    published = json.loads((res.dry_run_dir / hook / "cfg.json").read_text())["metadata"]
    assert "model_dir" not in published and str(tmp_path) not in json.dumps(published)
    # the user's copy of the model folder, somewhere else; the card run from another folder
    shutil.copytree(mine, tmp_path / "elsewhere" / asset.name)
    (tmp_path / "user").mkdir()
    monkeypatch.chdir(tmp_path / "user")
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save("image.jpg")
    code = code.replace(json.dumps(REPO), json.dumps(str(res.dry_run_dir))).replace(
        "local-dir:tiny-clip-tinyimagenet", "local-dir:../elsewhere/tiny-clip-tinyimagenet")
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same weights: not even a warning
        exec(code, ns)
    assert ns["steered"].shape == ns["plain"].shape == (1, 3)


def test_card_from_real_eval_results(tmp_path):
    """`vision-steer eval`'s own results.json (evaluation.evaluate on generated images) goes into the card."""
    from conftest import write_image_folder

    from sae_lens_vision_steer.data import load_image_dataset
    from sae_lens_vision_steer.evaluation import evaluate

    sae_dir = tmp_path / "sae"
    make_sae_folder(sae_dir, pretrained=None)  # the tiny CLIP has random weights
    model = make_tiny_clip(seed=2)
    data = load_image_dataset("imagefolder", data_dir=write_image_folder(tmp_path / "imgs", 3, 4),
                              transform=model.preprocess)
    result = evaluate(model, data, SAE.load_from_disk(sae_dir), ["zeroshot", "vs2"], num_workers=0,
                      show_progress=False, out_dir=tmp_path / "eval")
    res = publish_sae(sae_dir, REPO, SAE_ID, eval_results=tmp_path / "eval" / "results.json",
                      dry_run_dir=tmp_path / "out")
    card = (res.dry_run_dir / "README.md").read_text()
    for name, scores in result.methods.items():
        row = f"| {name} | {scores.top1:.2f} | {scores.top5:.2f} | {scores.mean_per_class:.2f} | "
        assert row in card, row
    assert f"{100 * result.methods['vs2'].coverage:.1f}%" in card and "`n_images=12`" in card
    assert "`dataset=imagefolder imgs`" in card and str(tmp_path) not in card


@pytest.mark.slow
def test_publish_a_sae_trained_by_train_sae(tmp_path):
    """End to end: cache activations of a tiny CLIP, train with `train_sae`, dry-run publish, load back."""
    training = pytest.importorskip("sae_lens_vision_steer.training.trainer")
    from conftest import write_image_folder

    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.data import load_image_dataset

    model = make_tiny_clip(seed=0)
    data = load_image_dataset("imagefolder", data_dir=write_image_folder(tmp_path / "imgs", 3, 10),
                              transform=model.preprocess)
    cache = cache_activations(model, data, HOOK, tmp_path / "cache", num_workers=0, batch_size=16,
                              show_progress=False)
    training.train_sae(cache, HOOK, k=4, expansion_factor=2, epochs=2, batch_size=8, out_dir=tmp_path / "sae",
                       show_progress=False)
    res = publish_sae(tmp_path / "sae", REPO, SAE_ID, dry_run_dir=tmp_path / "out")
    assert sorted(res.files) == ["README.md", f"{SAE_ID}/cfg.json", f"{SAE_ID}/sae_weights.safetensors",
                                 f"{SAE_ID}/sparsity.safetensors"]  # training_run.json stays local
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    card = (res.dry_run_dir / "README.md").read_text()
    assert f"| Held-out FVU | {meta['heldout_fvu']:.4f} |" in card
    assert f"| Training samples seen | {meta['n_training_samples']:,} |" in card
    assert str(tmp_path) not in card
    sae, info = load_vision_sae(res.dry_run_dir, SAE_ID)
    x = torch.randn(5, 64)
    assert torch.equal(reconstruct(sae, x), reconstruct(SAE.load_from_disk(tmp_path / "sae"), x))
    assert info.hook_name == HOOK and info.metadata["dead_fraction"] == meta["dead_fraction"]


def test_card_merges_sections_of_several_saes():
    a = merge_model_card(None, "a", "<!-- vision-steer:begin sae_id=a -->\nA1\n<!-- vision-steer:end sae_id=a -->\n")
    ab = merge_model_card(a, "b", "<!-- vision-steer:begin sae_id=b -->\nB\n<!-- vision-steer:end sae_id=b -->\n")
    ab2 = merge_model_card(ab, "a", "<!-- vision-steer:begin sae_id=a -->\nA2\n<!-- vision-steer:end sae_id=a -->\n")
    assert list(card_sections(ab2)) == ["a", "b"]
    assert "A2" in ab2 and "A1" not in ab2 and "B" in card_sections(ab2)["b"]
    assert ab2.count("library_name: saelens") == 1
    foreign = merge_model_card("# someone else's README\n", "b", card_sections(ab)["b"])
    assert "someone else" not in foreign and list(card_sections(foreign)) == ["b"]


# ------------------------------------------------------------------------------------------ upload
class FakeHub:
    """Stands in for the Hub behind `HfApi`'s network calls; records what publish_sae sends."""

    def __init__(self, files: dict[str, bytes] | None = None, private: bool | None = None):
        # private=None: the repository does not exist yet (create_repo makes it)
        self.files = dict(files or {".gitattributes": b"*.safetensors filter=lfs\n"})
        self.private = private
        self.calls: list[tuple] = []
        self.commits: list[dict] = []
        self.fail_next_commit = False

    def install(self, monkeypatch, tmp_path: Path) -> None:
        hub = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kw):
            hub.calls.append(("create_repo", repo_id, private, exist_ok))
            if hub.private is None:
                hub.private = bool(private)
            elif not exist_ok:
                raise AssertionError("create_repo on an existing repo without exist_ok")
            return f"https://huggingface.co/{repo_id}"

        def create_branch(api, repo_id, *, branch, exist_ok=False, **kw):
            hub.calls.append(("create_branch", repo_id, branch, exist_ok))

        def repo_info(api, repo_id, *, revision=None, **kw):
            hub.calls.append(("repo_info", repo_id, revision))
            return SimpleNamespace(sha="c" * 40, private=hub.private)

        def list_repo_files(api, repo_id, *, revision=None, **kw):
            hub.calls.append(("list_repo_files", repo_id, revision))
            return sorted(hub.files)

        def hf_hub_download(api, repo_id, filename, *, revision=None, **kw):
            hub.calls.append(("hf_hub_download", repo_id, filename, revision))
            path = tmp_path / "fake_hub_download" / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(hub.files[filename])
            return str(path)

        def create_commit(api, repo_id, operations, *, commit_message, revision=None, parent_commit=None, **kw):
            ops = list(operations)
            hub.calls.append(("create_commit", repo_id, revision, parent_commit))
            if hub.fail_next_commit:
                hub.fail_next_commit = False
                raise ConnectionError("connection reset during upload")
            added = {}
            for op in ops:
                if isinstance(op, CommitOperationAdd):
                    with op.as_file() as f:
                        added[op.path_in_repo] = f.read()
            deleted = [op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)]
            assert ops and all(isinstance(op, (CommitOperationAdd, CommitOperationDelete)) for op in ops)
            hub.commits.append({"added": added, "deleted": deleted, "message": commit_message, "revision": revision})
            for p in deleted:
                hub.files.pop(p, None)
            hub.files.update(added)
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(hub.commits)}")

        for name, fn in dict(create_repo=create_repo, create_branch=create_branch, repo_info=repo_info,
                             list_repo_files=list_repo_files, hf_hub_download=hf_hub_download,
                             create_commit=create_commit).items():
            monkeypatch.setattr(HfApi, name, fn)
        for name in ("upload_file", "upload_folder", "delete_file", "preupload_lfs_files"):  # must not be used
            monkeypatch.setattr(HfApi, name, lambda *a, _n=name, **k: pytest.fail(f"unexpected HfApi.{_n}"))
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")


def test_upload_is_one_commit_with_exactly_the_dry_run_files(sae_dir, dry_run, monkeypatch, tmp_path):
    hub = FakeHub()
    hub.install(monkeypatch, tmp_path)
    res = publish_sae(sae_dir, REPO, SAE_ID, private=True, eval_results=sae_dir.parent / "results.json")
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    dry_files = {p.relative_to(dry_run).as_posix(): p.read_bytes() for p in dry_run.rglob("*") if p.is_file()}
    assert commit["added"] == dry_files  # same paths, same bytes
    assert commit["deleted"] == [] and commit["revision"] == "main"
    assert set(res.files) == set(dry_files) and res.commit_url.endswith("/commit/1")
    assert ("create_repo", REPO, True, True) in hub.calls
    assert ("create_commit", REPO, "main", "c" * 40) in hub.calls  # guarded by the commit the card was read at
    assert not any(c[0] == "create_branch" for c in hub.calls)


def test_failed_upload_changes_nothing_and_a_retry_completes(sae_dir, monkeypatch, tmp_path):
    hub = FakeHub()
    hub.install(monkeypatch, tmp_path)
    before = dict(hub.files)
    hub.fail_next_commit = True
    with pytest.raises(ConnectionError):
        publish_sae(sae_dir, REPO, SAE_ID, eval_results=False)
    assert hub.files == before  # nothing half-uploaded: the one commit never happened
    publish_sae(sae_dir, REPO, SAE_ID, eval_results=False)
    publish_sae(sae_dir, REPO, SAE_ID, eval_results=False)  # re-run: same files again
    assert len(hub.commits) == 2 and hub.commits[0]["added"] == hub.commits[1]["added"]
    assert sorted(hub.files) == [".gitattributes", "README.md", f"{SAE_ID}/cfg.json",
                                 f"{SAE_ID}/sae_weights.safetensors", f"{SAE_ID}/sparsity.safetensors"]


def test_republish_removes_stale_files_and_keeps_other_saes_in_the_card(sae_dir, tmp_path, monkeypatch):
    hub = FakeHub()
    hub.install(monkeypatch, tmp_path)
    other = tmp_path / "other"
    make_sae_folder(other, seed=3, hook_name="blocks.0.hook_resid_post")
    publish_sae(other, REPO, "blocks.0.hook_resid_post", eval_results=False)
    publish_sae(sae_dir, REPO, SAE_ID, eval_results=False)
    hub.files[f"{SAE_ID}/runner_cfg.json"] = b"{}"  # left over from some earlier upload

    new = tmp_path / "new"
    make_sae_folder(new, seed=4, sparsity=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own card: no "replacing README" warning
        res = publish_sae(new, REPO, SAE_ID, eval_results=False)
    assert hub.private is False
    last = hub.commits[-1]
    assert sorted(last["deleted"]) == [f"{SAE_ID}/runner_cfg.json", f"{SAE_ID}/sparsity.safetensors"]
    assert res.deleted == tuple(sorted(last["deleted"]))
    assert last["added"][f"{SAE_ID}/sae_weights.safetensors"] == (new / "sae_weights.safetensors").read_bytes()
    card = hub.files["README.md"].decode()
    assert list(card_sections(card)) == ["blocks.0.hook_resid_post", SAE_ID]
    assert "blocks.0.hook_resid_post/cfg.json" in hub.files  # the other SAE is untouched


def test_foreign_readme_is_replaced_with_a_warning(sae_dir, tmp_path, monkeypatch):
    hub = FakeHub({".gitattributes": b"", "README.md": b"# My notes\n"})
    hub.install(monkeypatch, tmp_path)
    with pytest.warns(UserWarning, match="not written by vision-steer"):
        publish_sae(sae_dir, REPO, SAE_ID, eval_results=False)
    assert "My notes" not in hub.files["README.md"].decode()


def test_revision_branch_is_created_and_the_card_says_so(sae_dir, tmp_path, monkeypatch):
    hub = FakeHub()
    hub.install(monkeypatch, tmp_path)
    publish_sae(sae_dir, REPO, SAE_ID, revision="v2", eval_results=False)
    assert ("create_branch", REPO, "v2", True) in hub.calls and hub.commits[0]["revision"] == "v2"
    card = hub.files["README.md"].decode()
    assert f'load_vision_sae("{REPO}", "{SAE_ID}", revision="v2")' in card and "reads the `main` branch only" in card


def test_private_upload_refuses_an_existing_public_repo(sae_dir, tmp_path, monkeypatch):
    hub = FakeHub(private=False)
    hub.install(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match="public"):
        publish_sae(sae_dir, REPO, SAE_ID, private=True, eval_results=False)
    assert hub.commits == []


def test_no_token_is_a_clear_error_before_any_network_call(sae_dir, tmp_path, monkeypatch):
    hub = FakeHub()
    hub.install(monkeypatch, tmp_path)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        publish_sae(sae_dir, REPO, SAE_ID, eval_results=False)
    assert hub.calls == []


def test_cli_takes_no_token_argument_and_dry_runs(sae_dir, tmp_path, capsys):
    publish = build_parser()._subparsers._group_actions[0].choices["publish"]
    options = [o for action in publish._actions for o in action.option_strings]
    assert "--sae-id" in options and not [o for o in options if "token" in o.lower()]
    out = tmp_path / "cli_out"
    rc = main(["publish", "--sae", str(sae_dir), "--repo-id", REPO, "--sae-id", SAE_ID, "--dry-run", str(out),
               "--no-eval-results"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"{SAE_ID}/sae_weights.safetensors" in printed and "nothing uploaded" in printed
    assert "Zero-shot and steered accuracy" not in (out / "README.md").read_text()
    rc = main(["publish", "--sae", str(tmp_path), "--repo-id", REPO, "--sae-id", SAE_ID, "--dry-run",
               str(tmp_path / "x")])
    assert rc == EXIT_INPUT and "not a SAELens SAE folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_get_clear_errors(sae_dir, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="ORG/NAME"):
        publish_sae(sae_dir, "noslash", SAE_ID, dry_run_dir=out)
    with pytest.raises(ValueError, match="invalid sae id"):
        publish_sae(sae_dir, REPO, "../up", dry_run_dir=out)
    with pytest.raises(ValueError, match="invalid sae id"):
        publish_sae(sae_dir, REPO, "a b", dry_run_dir=out)
    bare = tmp_path / "bare"
    make_sae_folder(bare, hook_name=None, model_name=None)
    with pytest.raises(ValueError, match="hook_name"):
        publish_sae(bare, REPO, SAE_ID, dry_run_dir=out)
    wrong_sparsity = tmp_path / "ws"
    make_sae_folder(wrong_sparsity)
    save_file({"sparsity": torch.zeros(5)}, wrong_sparsity / "sparsity.safetensors")
    with pytest.raises(ValueError, match="shape"):
        publish_sae(wrong_sparsity, REPO, SAE_ID, dry_run_dir=out)
    other_hook = tmp_path / "r1.json"
    other_hook.write_text(json.dumps({**RESULTS, "config": {"hook_name": "blocks.0.hook_resid_post"}}))
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post"):
        publish_sae(sae_dir, REPO, SAE_ID, eval_results=other_hook, dry_run_dir=out)
    for change in ({"random_weights": True}, {"pretrained": "laion2b_s34b_b79k"},
                   {"sae": {**RESULTS["config"]["sae"], "d_sae": 256}},
                   {"sae": {**RESULTS["config"]["sae"], "heldout_fvu": 0.5}}):
        other = tmp_path / "r3.json"
        other.write_text(json.dumps({**RESULTS, "config": {**RESULTS["config"], **change}}))
        with pytest.raises(ValueError, match="random|pretrained|d_sae|heldout_fvu"):
            publish_sae(sae_dir, REPO, SAE_ID, eval_results=other, dry_run_dir=out)
    broken = tmp_path / "r2.json"
    broken.write_text('{"methods": {"vs2": {"top1": "high"}}}')
    with pytest.raises(ValueError, match="should be a number"):
        publish_sae(sae_dir, REPO, SAE_ID, eval_results=broken, dry_run_dir=out)
    with pytest.raises(FileNotFoundError):
        publish_sae(sae_dir, REPO, SAE_ID, eval_results=tmp_path / "missing.json", dry_run_dir=out)
    assert not out.exists()  # nothing written by any failed call


# ------------------------------------------------------------------------------------------ loading
def test_load_vision_sae_from_folders(sae_dir, dry_run, tmp_path):
    x = torch.randn(4, 64)
    ref = reconstruct(SAE.load_from_disk(sae_dir), x)

    sae, info = load_vision_sae(sae_dir)  # a plain SAE folder
    assert torch.equal(reconstruct(sae, x), ref) and info.sae_id is None and info.folder == sae_dir
    assert info.hook_name == HOOK and info.model_name == "ViT-B-32" and info.pretrained == "openai"
    assert info.metadata["heldout_fvu"] == META["heldout_fvu"] and info.positions == "cls"

    sae, info = load_vision_sae(dry_run, SAE_ID)  # a Hub-like snapshot folder
    assert torch.equal(reconstruct(sae, x), ref) and info.sae_id == SAE_ID
    torch.testing.assert_close(log_feature_sparsity(info), torch.linspace(-5, -1, 128))
    sae, info = load_vision_sae(str(dry_run))  # one SAE in it: sae_id may be left out
    assert info.sae_id == SAE_ID and torch.equal(reconstruct(sae, x), ref)

    make_sae_folder(dry_run / "second", seed=5)
    with pytest.raises(ValueError, match="several SAEs"):
        load_vision_sae(dry_run)
    with pytest.raises(FileNotFoundError, match="second"):
        load_vision_sae(dry_run, "third")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_vision_sae(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="needs sae_id"):
        load_vision_sae("someone/unreachable-repo")


def test_load_from_hub_repo_uses_snapshot_download_for_that_sae_only(dry_run, monkeypatch):
    seen = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(dry_run)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sae, info = load_vision_sae(REPO, SAE_ID, revision="v2")
    assert seen == {"repo_id": REPO, "revision": "v2", "allow_patterns": [f"{SAE_ID}/*"]}
    assert info.source == REPO and info.folder == dry_run / SAE_ID and info.hook_name == HOOK


OFFLINE_SCRIPT = """
import json, sys, torch
from sae_lens import SAE
from sae_lens_vision_steer.sae.loading import load_vision_sae
x = torch.load(sys.argv[1])
sae, info = load_vision_sae({repo!r}, {sae_id!r})
plain = SAE.from_pretrained({repo!r}, {sae_id!r})
with torch.no_grad():
    torch.save({{"ours": sae.decode(sae.encode(x)), "saelens": plain.decode(plain.encode(x)),
                "hook": info.hook_name, "folder": str(info.folder)}}, sys.argv[2])
"""


@pytest.mark.slow  # an offline-Hub load or an accuracy check on real images (the slow tier)
def test_offline_load_from_the_hf_cache(dry_run, sae_dir, tmp_path):
    """With HF_HUB_OFFLINE=1 both `load_vision_sae(repo_id, sae_id)` and plain
    `SAE.from_pretrained(repo_id, sae_id)` read a populated HF cache (no mocks, real huggingface_hub)."""
    cache = tmp_path / "hf_cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for p in dry_run.rglob("*"):
        if p.is_file():
            dest = snapshot / p.relative_to(dry_run)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(p.read_bytes())
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)

    x = torch.randn(6, 64)
    torch.save(x, tmp_path / "x.pt")
    # Same thread count as this process, so the two reconstructions take the same float path.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    script = OFFLINE_SCRIPT.format(repo=REPO, sae_id=SAE_ID)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt")
    ref = reconstruct(SAE.load_from_disk(sae_dir), x)
    assert torch.equal(got["ours"], ref) and torch.equal(got["saelens"], ref)
    assert got["hook"] == HOOK and got["folder"] == str(snapshot / SAE_ID)
