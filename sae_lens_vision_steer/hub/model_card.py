"""The Hub model card (README.md) for published vision SAEs.

One card per repository, one section per SAE. Each section sits between `<!-- vision-steer:begin ... -->`
and `<!-- vision-steer:end ... -->` markers, so publishing another SAE to the same repository replaces or
adds its own section and keeps the others.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

from ..core.errors import UsageError
from ..core.identity import stock_config_differences, weights_from_name
from ..steering.vs2 import PAPER_GAMMA, PAPER_LAM

CARD_MARKER = "<!-- vision-steer:card -->"

_FRONT_MATTER = """---
library_name: saelens
tags:
- saelens
- sae_lens
- sparse-autoencoder
- vision
- clip
- open_clip
- visual-sparse-steering
---
"""

_INTRO = f"""# Vision SAEs for CLIP image towers

{CARD_MARKER}
Sparse autoencoders in [SAELens](https://github.com/decoderesearch/SAELens) format, trained on activations
of an [open_clip](https://github.com/mlfoundations/open_clip) CLIP image tower with `sae-lens-vision-steer`.
They can steer CLIP's zero-shot classification with Visual Sparse Steering (VS2, arXiv 2506.01247).
Each SAE lives in its own folder: `<sae_id>/cfg.json`, `<sae_id>/sae_weights.safetensors` and, when
recorded, `<sae_id>/sparsity.safetensors` (log10 firing rate of each latent). The vision metadata (CLIP
model, hook, training data, held-out metrics) is in `cfg.json` under `metadata`.
"""

_SECTION_RE = re.compile(
    r"<!-- vision-steer:begin sae_id=(?P<id>\S+) -->\n.*?<!-- vision-steer:end sae_id=(?P=id) -->\n?",
    re.DOTALL,
)

# Columns of the accuracy table: results.json key, header, format.
_EVAL_COLUMNS = (
    ("top1", "Top-1 (%)", "{:.2f}"),
    ("top5", "Top-5 (%)", "{:.2f}"),
    ("mean_per_class", "Mean per-class (%)", "{:.2f}"),
    ("delta_top1", "Δ top-1 (points)", "{:+.2f}"),
    ("coverage", "Steered", "{:.1%}"),  # results.json: fraction of images steered
)
# Evaluation settings shown under the table (results.json `config`); local paths and seeds are left out.
_EVAL_SETTINGS = ("dataset", "split", "n_images", "templates", "lam", "gamma", "fvu_threshold", "fvu_quantile")


def _fmt(value: Any, spec: str = "{}") -> str:
    """A number formatted with `spec` ("{}": any value as escaped text, "`{}`": as code); a value that is not a
    number where one is expected (hostile or damaged metadata) is shown as escaped text, never formatted."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if spec == "{}":
        return _text(value)
    if spec == "`{}`":
        return _code(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return spec.format(value)
    return _text(value)


# Characters that end a string, a code span, a fenced block, an HTML tag or our section markers, and those that
# are not printable (bidi overrides that make code read differently than it runs, control characters): written
# as escapes inside the example code, and as their escape text in prose.
_CODE_UNSAFE = set("`<>&")
_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+=, -]+")  # shown as a code span as it is: nothing to escape


def _escape_char(c: str) -> str:
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def _py(value: Any) -> str:
    """A Python literal for the example code: strings JSON-encoded (double quotes, one line, no character that
    could close the code block, start markup or hide what the code does), None/True/False/numbers as Python
    writes them, anything else as its JSON text."""
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return "".join(_escape_char(c) if c in _CODE_UNSAFE or not c.isprintable() else c for c in text)
    if value is None or isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return repr(value)
    return _py(json.dumps(value, sort_keys=True))


def _text(value: Any) -> str:
    """Prose: any string from metadata as plain text (one line, HTML-escaped, Markdown punctuation backslashed,
    unprintable characters as their escape text)."""
    text = "".join(c if c.isprintable() else _escape_char(c) for c in " ".join(str(value).split()))
    return re.sub(r"([\\`*_\[\]~])", r"\\\1", html.escape(text, quote=True))


def _code(value: Any) -> str:
    """A value as an inline code span when it is plain (letters, digits, spaces, `_.:/@+=,-`), else as escaped prose."""
    text = str(value)
    return f"`{text}`" if _PLAIN.fullmatch(text) else _text(text)


def _cell(text: Any) -> str:
    # A `|` inside a cell would split it; newlines would end the row.
    return str(text).replace("|", "\\|").replace("\n", " ")


def load_eval_results(path: str | Path) -> dict[str, Any]:
    """Read and check a `vision-steer eval` results.json (`{"config", "methods", ...}`)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    methods = results.get("methods") if isinstance(results, dict) else None
    if not isinstance(methods, dict) or not methods:
        raise UsageError(f"{path} is not a `vision-steer eval` results file: it has no 'methods' mapping")
    for name, metrics in methods.items():
        if not isinstance(metrics, dict):
            raise UsageError(f"{path}: methods[{name!r}] should be a mapping of metrics, got {type(metrics).__name__}")
        for key, _, _ in _EVAL_COLUMNS:
            value = metrics.get(key)
            if value is not None and not isinstance(value, (int, float)):
                raise UsageError(f"{path}: methods[{name!r}][{key!r}] should be a number, got {value!r}")
    if not isinstance(results.get("config", {}), dict):
        raise UsageError(f"{path}: 'config' should be a mapping")
    return results


def eval_table(results: Mapping[str, Any]) -> str:
    """Markdown table of zero-shot and steered accuracy, one row per method, in the file's order."""
    header = "| Method | " + " | ".join(h for _, h, _ in _EVAL_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(_EVAL_COLUMNS)
    rows = [
        f"| {_cell(_text(name))} | " + " | ".join(_fmt(m.get(k), spec) for k, _, spec in _EVAL_COLUMNS) + " |"
        for name, m in results["methods"].items()
    ]
    return "\n".join([header, rule, *rows])


def _eval_settings(results: Mapping[str, Any]) -> str:
    config = results.get("config") or {}
    shown = {k: config[k] for k in _EVAL_SETTINGS if isinstance(config.get(k), (str, int, float))}
    if str(shown.get("dataset", "")).startswith("imagefolder:"):  # keep local paths out of a public card
        shown["dataset"] = "imagefolder " + Path(shown["dataset"].split(":", 1)[1]).name
    parts = [_code(f"{k}={v}") for k, v in shown.items() if len(str(v)) <= 80]
    n_classes = len(results.get("classnames") or [])
    if n_classes:
        parts.append(f"{n_classes} classes")
    return ", ".join(parts)


def _portable_data_name(data: Any) -> str:
    if isinstance(data, str) and data.startswith("imagefolder:"):  # keep local paths out of a public card
        return f"imagefolder {Path(data.split(':', 1)[1]).name}"
    return str(data)


def _local_dir_note(model_name: Any, fingerprint: Any) -> list[str]:
    """A comment above the card's load line for a `local-dir:` model: the folder is the user's own."""
    if not (isinstance(model_name, str) and model_name.startswith("local-dir:")):
        return []
    quoted = _py(model_name)[1:-1]  # escaped as in a string: no newline or fence can leave the comment
    return [f"# {quoted}: a local open_clip folder (any path to it works: the SAE checks the weights"
            + (f", fingerprint {_py(str(fingerprint))[1:-1]}" if fingerprint else "") + ")"]


def sae_eval_table(records: Mapping[str, Any]) -> str:
    """The figures `vision-steer sae-eval` recorded in the SAE's metadata (`sae_eval`, one row per data set)."""
    rows = []
    for key, r in records.items():
        kl = r.get("kl_recovered")
        rows.append(f"| {_cell(key)} | {_fmt(r.get('n_images'))} | {_fmt(r.get('fvu'), '{:.4f}')} | "
                    f"{_fmt(r.get('explained_variance'), '{:.4f}')} | {_fmt(r.get('l0'), '{:.2f}')} | "
                    f"{_fmt(r.get('dead_fraction'), '{:.4f}')} | {_fmt(r.get('top1_clean'), '{:.2f}')} | "
                    f"{_fmt(r.get('delta_top1'), '{:+.2f}')} | {'—' if kl is None else f'{kl:.4f}'} "
                    f"({_cell(r.get('baseline'))}-ablation) |")
    return "\n".join([
        "### SAE yardstick (`vision-steer sae-eval`)", "",
        "Mean-centred FVU and explained variance, L0 and dead fraction over the images; top-1 of plain zero-shot "
        "CLIP and its change with the reconstruction spliced in (error term off); fraction of the zero-shot KL "
        "recovered against the named ablation (SAELens' `kl_div_score`, on CLIP's scaled logits).", "",
        "| Data | Images | FVU | Explained var. | L0 | Dead | Zero-shot top-1 | Δ top-1 | KL recovered |",
        "|---|---|---|---|---|---|---|---|---|", *rows])


def sae_card_section(
    repo_id: str,
    sae_id: str,
    sae_cfg: Mapping[str, Any],
    metadata: Mapping[str, Any],
    eval_results: Mapping[str, Any] | None = None,
    revision: str = "main",
) -> str:
    """The card section for one SAE: facts table, accuracy table, and the code to load and steer.

    `sae_cfg`: `d_in`, `d_sae`, `k` (top-k only), `architecture`; `metadata`: the SAE's `cfg.metadata`.
    """
    n_samples = metadata.get("n_training_samples")
    dead = metadata.get("dead_fraction")
    data = metadata.get("dataset")
    split = metadata.get("split")
    if isinstance(data, str) and data.startswith("imagefolder:"):  # keep local paths out of a public card
        data = f"imagefolder {Path(data.split(':', 1)[1]).name}"
    data_text = "not recorded" if data is None else _code(data) + (f", split {_code(split)}" if split else "")
    members = metadata.get("dataset_members")
    if members:  # a union of training splits (union.py): name every member
        data_text = f"union of {len(members)} data sets: " + ", ".join(
            f"{_code(_portable_data_name(m.get('dataset')))} (split {_code(m.get('split'))}"
            + (f", {m['n_images']:,} images)" if isinstance(m.get("n_images"), int) else ")") for m in members)
    objective = metadata.get("objective")
    w_aux = metadata.get("w_aux")
    pretrained = metadata.get("pretrained")
    model_name = metadata.get("model_name")
    kwargs = metadata.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise UsageError(f"metadata model_kwargs should be a mapping, got {type(kwargs).__name__}")
    if weights_from_name(model_name) and kwargs.get("load_weights") is not False:
        weights = "weights that come with the name"
    elif pretrained:
        weights = f"pretrained {_code(pretrained)}"
    else:
        weights = "random initial weights (no pretrained tag)"
    changed = stock_config_differences(model_name, metadata.get("model_config"))
    arch = ("; architecture changed from the stock config: " + ", ".join(_code(f"{k}={v}") for k, v in changed.items())
            if changed else "")
    facts = [
        ("CLIP model", f"open_clip {_code(model_name)}, {weights}{arch}"),
        ("Hook", f"{_code(metadata.get('hook_name'))} (a `HookedCLIP` hook point)"),
        ("Positions", _fmt(metadata.get("positions"), "`{}`")),
        ("d_in / d_sae / k", f"{_fmt(sae_cfg.get('d_in'))} / {_fmt(sae_cfg.get('d_sae'))} / {_fmt(sae_cfg.get('k'))}"),
        ("Architecture", _code(sae_cfg.get("architecture"))
         + (f", objective {_code(objective)}" if objective else "") + (f", w_aux {_text(w_aux)}" if w_aux is not None else "")),
        ("Training data", data_text),
        ("Training samples seen", _fmt(n_samples, "{:,}")),
        ("Held-out FVU", _fmt(metadata.get("heldout_fvu"), "{:.4f}")),
        ("L0 (mean active latents)", _fmt(metadata.get("mean_l0"), "{:.2f}")),
        ("Dead fraction", f"{dead:.4f} ({dead:.2%} of latents)" if isinstance(dead, (int, float))
         and not isinstance(dead, bool) else _fmt(dead)),
    ]
    source = metadata.get("source")
    if isinstance(source, dict) and source.get("format"):  # an SAE trained elsewhere (sae/formats): credit it
        file = f", `{source['file']}`" if source.get("file") else ""
        library = source.get("library") or source["format"]
        facts.insert(0, ("Trained with", f"{library} (imported from its `{source['format']}` files{file})"))
    lines = [
        f"<!-- vision-steer:begin sae_id={sae_id} -->",
        f"## SAE `{sae_id}`",
        "",
        "| | |",
        "|---|---|",
        *(f"| {_cell(k)} | {_cell(v)} |" for k, v in facts),
        "",
    ]
    if metadata.get("sae_eval"):
        lines += [sae_eval_table(metadata["sae_eval"]), ""]
    if eval_results is not None:
        settings = _eval_settings(eval_results)
        lines += [
            "### Zero-shot and steered accuracy",
            "",
            "From `vision-steer eval`" + (f" ({settings})" if settings else "") + ". Δ top-1 is against plain zero-shot"
            " CLIP; *Steered* is the share of images the method changed.",
            "",
            eval_table(eval_results),
            "",
        ]
    rev_arg = "" if revision == "main" else f", revision={_py(revision)}"
    lines += [
        "### Load and steer",
        "",
        "```bash",
        "pip install sae-lens-vision-steer",
        "```",
        "",
        "```python",
        *(["import json", ""] if kwargs else []),
        "import torch",
        "from PIL import Image",
        "from sae_lens_vision_steer import HookedCLIP, ZeroShotClassifier, load_vision_sae",
        "from sae_lens_vision_steer.steering import VS2Steering",
        "",
        f"sae, info = load_vision_sae({_py(repo_id)}, {_py(sae_id)}{rev_arg})",
        *_local_dir_note(model_name, metadata.get("model_fingerprint")),
        *([f"model_kwargs = json.loads({_py(json.dumps(kwargs, sort_keys=True))})"] if kwargs else []),
        f"model = HookedCLIP.from_pretrained({_py(model_name)}, pretrained={_py(pretrained)}"
        + (", **model_kwargs" if kwargs else "") + ")",
        f"steer = VS2Steering(sae, lam={PAPER_LAM}, gamma={PAPER_GAMMA})",
        "",
        'classifier = ZeroShotClassifier(model, ["cat", "dog", "car"])',
        'image = model.preprocess(Image.open("image.jpg").convert("RGB")).unsqueeze(0)',
        "with torch.no_grad():",
        "    plain = classifier.logits(model.encode_image(image))",
        "    with model.hooks(fwd_hooks=steer.fwd_hooks(model)):  # fwd_hooks(model) checks the SAE fits the hook",
        "        steered = classifier.logits(model.encode_image(image))",
        'print("plain:", plain.softmax(-1), "steered:", steered.softmax(-1), "steered share:", steer.coverage)',
        "```",
        "",
        f"`lam={PAPER_LAM}, gamma={PAPER_GAMMA}` is the paper's best setting for CIFAR-100 with ViT-B/32; tune"
        " it for other data.",
        "",
        "### Plain SAELens",
        "",
        "The folder is a standard SAELens SAE and loads without this package:",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
        f"sae = SAE.from_pretrained({_py(repo_id)}, {_py(sae_id)})",
        "print(sae.cfg.metadata.hook_name, sae.cfg.metadata.model_name, sae.cfg.metadata.pretrained)",
        "```",
        "",
        "The hook is a `HookedCLIP` hook point of the CLIP image tower, not of a TransformerLens language model,"
        " so run the SAE on activations from `sae_lens_vision_steer.HookedCLIP` (e.g. `model.run_with_cache`).",
        "",
    ]
    if revision != "main":
        lines += [
            f"This SAE was published to revision `{revision}`; `SAE.from_pretrained` reads the `main` branch only,"
            " so use `load_vision_sae(..., revision=...)` for it.",
            "",
        ]
    lines += [f"<!-- vision-steer:end sae_id={sae_id} -->", ""]
    return "\n".join(lines)


def card_sections(card: str) -> dict[str, str]:
    """The SAE sections of a card written by this module, by sae_id, in order."""
    return {m.group("id"): m.group(0) for m in _SECTION_RE.finditer(card)}


def merge_model_card(existing: str | None, sae_id: str, section: str) -> str:
    """The repository card with `section` for `sae_id` added or replaced.

    Sections of other SAEs in an existing card written by this package are kept (in their order); any
    other README is replaced (the Hub keeps it in the repository history).
    """
    sections = card_sections(existing) if existing and CARD_MARKER in existing else {}
    sections[sae_id] = section if section.endswith("\n") else section + "\n"
    return _FRONT_MATTER + "\n" + _INTRO + "\n" + "\n".join(sections.values())


def is_vision_steer_card(text: str) -> bool:
    return CARD_MARKER in text
