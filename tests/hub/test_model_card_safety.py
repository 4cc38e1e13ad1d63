"""Issue 19, item 4: the model card quotes what it prints. Hostile metadata (backticks, HTML, a kwargs key that
is Python code, section markers, bidi overrides) cannot add markup to README.md or code to its example."""

from __future__ import annotations

import ast
import json
import re

from sae_lens_vision_steer.hub.model_card import card_sections, merge_model_card, sae_card_section

EVIL_KEY = 'a=1); __import__("os").system("touch /tmp/pwned"); (b=1'
HOSTILE = {
    "model_name": "ViT-B-32`<img src=x onerror=alert(1)>```\n# heading",
    "pretrained": 'openai"); import os #',
    "model_kwargs": {EVIL_KEY: 1, "vision_cfg": {"layers": "`<script>alert(1)</script>"}},
    "hook_name": "blocks.1.hook_resid_post<b>bold</b>",
    "dataset": "x`<svg onload=alert(1)>",
    "split": "val<!-- vision-steer:end sae_id=a -->",
    "objective": "topk\u202egnp.exe",
    "n_training_samples": "abc",
    "heldout_fvu": "<i>",
    "dead_fraction": "1e",
}
RESULTS = {"methods": {"<svg onload=alert(2)>": {"top1": 1.0}, "zeroshot": {"top1": 0.5}},
           "config": {"dataset": "x`<iframe>", "split": "val"}}


def _card() -> str:
    section = sae_card_section("me/repo", "a", {"d_in": 64, "d_sae": 256, "k": "<b>", "architecture": "topk`"},
                               HOSTILE, RESULTS)
    return merge_model_card(None, "a", section)


def test_hostile_metadata_adds_no_markup_to_the_card():
    card = _card()
    prose = re.sub(r"```.*?```", "", card, flags=re.DOTALL)  # outside the fenced code blocks
    for tag in ("<img", "<svg", "<script", "<iframe", "<b>", "<i>"):
        assert tag not in card, tag  # escaped in prose, \u-escaped in code
    assert "\u202e" not in card  # the bidi override is shown as its escape text
    assert card.count("```") % 2 == 0 and card.count("```python") == 2  # no fence opened or closed by a value
    assert not re.search(r"^# heading", prose, re.MULTILINE)  # a newline in a value cannot start a heading
    # the section markers are ours only: one section, parsed back whole
    sections = card_sections(card)
    assert list(sections) == ["a"] and sections["a"].rstrip().endswith("<!-- vision-steer:end sae_id=a -->")
    assert card.count("<!-- vision-steer:end") == 1
    # inline code spans are balanced on every line (a value cannot close one and open raw text)
    for line in prose.splitlines():
        assert len(re.findall(r"(?<!\\)`", line)) % 2 == 0, line


def test_the_example_code_is_the_code_we_wrote_with_the_values_as_data():
    card = _card()
    code = card.split("```python\n")[1].split("```")[0]
    tree = ast.parse(code)  # still Python
    calls = sorted({n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id
                    for n in ast.walk(tree) if isinstance(n, ast.Call)})
    assert "system" not in calls and "__import__" not in calls
    assert [n.names[0].name for n in tree.body if isinstance(n, ast.Import)] == ["json", "torch"]
    # the values round-trip: the kwargs JSON and the strings are exactly the metadata's
    assign = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "model_kwargs")
    assert json.loads(ast.literal_eval(assign.value.args[0])) == HOSTILE["model_kwargs"]
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "from_pretrained"
                and getattr(n.func.value, "id", "") == "HookedCLIP")
    assert ast.literal_eval(call.args[0]) == HOSTILE["model_name"]
    assert ast.literal_eval(call.keywords[0].value) == HOSTILE["pretrained"]
    assert call.keywords[1].arg is None  # **model_kwargs, not keys pasted as code


def test_plain_values_still_read_as_code():
    meta = {"model_name": "ViT-B-32", "pretrained": "openai", "hook_name": "blocks.11.hook_resid_post",
            "dataset": "cifar100", "split": "train", "model_kwargs": {}}
    card = sae_card_section("me/repo", "a", {"d_in": 768, "d_sae": 6144, "k": 64, "architecture": "topk"}, meta)
    assert "open_clip `ViT-B-32`, pretrained `openai`" in card and "`blocks.11.hook_resid_post`" in card
    assert 'HookedCLIP.from_pretrained("ViT-B-32", pretrained="openai")' in card and "import json" not in card


def test_a_local_dir_name_stays_inside_its_code_comment():
    name = "local-dir:m\n```\n<script>alert(1)</script>\nimport os; os.system('x')"
    card = sae_card_section("me/repo", "a", {"d_in": 64, "d_sae": 256, "k": 8, "architecture": "topk"},
                            {"model_name": name, "model_fingerprint": "ab`c\nd", "model_kwargs": {}})
    code = card.split("```python\n")[1].split("```")[0]
    tree = ast.parse(code)
    assert not any(isinstance(n, ast.Import) and n.names[0].name == "os" for n in ast.walk(tree))
    assert "<script" not in card and card.count("```") % 2 == 0
