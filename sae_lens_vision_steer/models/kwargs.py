"""Which model keyword arguments may come from a file, and which only from the user.

`HookedCLIP.from_pretrained(name, pretrained, **kwargs)` passes `kwargs` to open_clip's `create_model`,
timm's `create_model` or transformers' `from_pretrained`. Some of those arguments are architecture options
(`vision_cfg`, `depth`, `num_hidden_layers`, ...); others decide how files are loaded (`weights_only`,
`trust_remote_code`, `pickle_module`, `cache_dir`, a second checkpoint path, ...). A file we are handed (an
SAE's `cfg.json`, a `reproduce` grid) is data, and data must not decide how code-bearing files are read:

- `check_file_model_kwargs`: kwargs read from a file must be architecture options of the model's family
  (the allowlists below); a loading-safety switch or any other key is refused, naming the file and the key.
- `check_user_model_kwargs`: kwargs the user passes explicitly (`--model-kwargs`, a Python keyword argument)
  may set a loading-safety switch, with a warning when it weakens a default.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from ..core.errors import InputError, UsageError
from ..core.fileio import reject_duplicate_keys

# Arguments that decide whether a file may run code when it is loaded: never from a file; from the user
# only with a warning (unless set to the safe value).
SAFETY_SWITCHES = frozenset({
    "weights_only", "load_weights_only", "pickle_module", "pickle_load_args", "trust_remote_code", "use_safetensors",
    "from_tf", "from_flax", "gguf_file", "jit", "code_revision",
})
# Every argument that decides how or from where weights, code or configs are loaded: never from a file, never
# recorded with the model (they are this run's choice, not the network).
LOADING_SWITCHES = SAFETY_SWITCHES | frozenset({
    "mmap", "map_location", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_image_path",
    "pretrained_text_path", "pretrained_hf", "pretrained_image", "pretrained_text", "require_pretrained", "cache_dir",
    "state_dict", "local_files_only", "force_download", "proxies", "token", "use_auth_token", "revision",
    "subfolder", "variant", "device_map", "offload_folder", "offload_state_dict", "key_mapping", "adapter_kwargs",
    "adapter_name", "config", "quantization_config",
    # nested open_clip tower configs: weights downloaded into a tower
    "timm_model_pretrained", "hf_model_pretrained",
})
# The value of a switch that keeps loading safe: no warning when the user sets it.
SAFE_VALUES = {"weights_only": True, "load_weights_only": True, "trust_remote_code": False, "use_safetensors": True,
               "jit": False, "from_tf": False, "from_flax": False}
# `HookedCLIP.from_pretrained`'s own named arguments: a kwarg of that name would collide with them.
RESERVED = frozenset({"model_name", "pretrained", "device", "use_attn_result", "cls"})

OPEN_CLIP_OPTIONS = frozenset({
    # open_clip CLIP / CustomTextCLIP constructor (the model config's top level)
    "embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
    "nonscalar_logit_scale", "custom_text", "output_dict",
    # open_clip.create_model's architecture overrides
    "force_quick_gelu", "force_custom_text", "force_patch_dropout", "force_image_size", "force_context_length",
    "force_preprocess_cfg",
    # only turns weight loading off (random weights for an hf-hub:/local-dir: name)
    "load_weights",
})
TIMM_OPTIONS = frozenset({
    "img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "init_values",
    "class_token", "pos_embed", "no_embed_class", "reg_tokens", "pre_norm", "final_norm", "fc_norm",
    "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad", "drop_rate", "pos_drop_rate", "patch_drop_rate",
    "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "weight_init", "fix_init",
})
HF_OPTIONS = frozenset({
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size",
    "num_channels", "hidden_act", "layer_norm_eps", "attention_dropout", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "projection_dim", "layerscale_value", "drop_path_rate", "use_swiglu_ffn",
    "mlp_ratio", "qkv_bias", "initializer_range", "initializer_factor", "vision_config", "text_config",
    "attn_implementation",
})
FAMILY_OPTIONS = {"open_clip": OPEN_CLIP_OPTIONS, "timm": TIMM_OPTIONS, "hf": HF_OPTIONS}
MAX_IMAGE_SIZE = 1024  # a larger force_image_size / img_size from a file is refused (memory, not a real model)


def family_of(model_name: str | None) -> str:
    """`hf`, `timm` or `open_clip`: the library a model name is loaded with (`registry.load`)."""
    name = (model_name or "").strip()
    if name.lower().startswith("dinov2-") or name.startswith("hf:"):
        return "hf"
    return "timm" if name.startswith("timm:") else "open_clip"


def parse_model_kwargs(text: str, source: str) -> dict[str, Any]:
    """A JSON object of model kwargs (as a grid file stores them), duplicate keys refused."""
    try:
        value = json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except UsageError as e:
        raise InputError(f"{source}: {e}") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise InputError(f"{source} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InputError(f"{source} should be a JSON object, got {type(value).__name__}")
    return value


def check_file_model_kwargs(kwargs: Any, model_name: str | None, source: str) -> dict[str, Any]:
    """Model kwargs read from a file: only architecture options of the model's family, with sane sizes.
    `source` names the file and the field (e.g. `sae/cfg.json: metadata.model_kwargs`). Returns them."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise InputError(f"{source} should be a JSON object of architecture options, got {type(kwargs).__name__}")
    family = family_of(model_name)
    allowed = FAMILY_OPTIONS[family]
    for key, value in kwargs.items():
        if key in LOADING_SWITCHES:
            raise InputError(f"{source}: key {key!r} is a loading-safety switch; it is never taken from a file "
                             "(only an explicit --model-kwargs or keyword argument from you may set it)")
        if key in RESERVED:
            raise InputError(f"{source}: key {key!r} is an argument of its own, not a model kwarg")
        if key not in allowed:
            raise InputError(f"{source}: key {key!r} is not an architecture option of {family} models; "
                             f"allowed: {', '.join(sorted(allowed))}")
        if key in ("vision_cfg", "text_cfg") and family == "open_clip":
            _check_tower_cfg(key, value, source)
        if key in ("force_image_size", "img_size", "image_size"):
            _check_image_size(key, value, source)
    return dict(kwargs)


def _check_tower_cfg(key: str, value: Any, source: str) -> None:
    import dataclasses

    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if not isinstance(value, dict):
        raise InputError(f"{source}: {key} should be a JSON object, got {type(value).__name__}")
    fields = {f.name for f in dataclasses.fields(CLIPVisionCfg if key == "vision_cfg" else CLIPTextCfg)}
    for k, v in value.items():
        if k in LOADING_SWITCHES:
            raise InputError(f"{source}: key {key}.{k} is a loading-safety switch; it is never taken from a file")
        if k not in fields:
            raise InputError(f"{source}: key {key}.{k} is not an open_clip {key} field; fields: {', '.join(sorted(fields))}")
        if k == "image_size":
            _check_image_size(f"{key}.{k}", v, source)


def _check_image_size(key: str, value: Any, source: str) -> None:
    sizes = value if isinstance(value, (list, tuple)) else [value]
    if (not sizes or len(sizes) > 2 or
            not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_IMAGE_SIZE for s in sizes)):
        raise InputError(f"{source}: {key}={value!r} is not an image size (a whole number, or two, from 1 to "
                         f"{MAX_IMAGE_SIZE})")


def check_user_model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model kwargs the user passed explicitly: a name that collides with `from_pretrained`'s own arguments
    is refused; a loading-safety switch set to an unsafe value is allowed, with a warning."""
    check_kwarg_names(kwargs)
    for key, value in kwargs.items():
        if key in SAFETY_SWITCHES and SAFE_VALUES.get(key, object()) != value:
            warnings.warn(f"model kwarg {key}={value!r} changes how model files are loaded (e.g. lets a pickle run "
                          "code); use it only for files you trust", UserWarning, stacklevel=3)
    return kwargs


def check_kwarg_names(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Refuse a model kwarg named like one of `from_pretrained`'s own arguments (`device`, `pretrained`, ...):
    call it before `from_pretrained(name, pretrained=..., device=..., **kwargs)`, where Python itself would
    stop with a TypeError."""
    for key in kwargs:
        if key in RESERVED:
            raise UsageError(f"model kwarg {key!r} collides with from_pretrained's own argument of that name; "
                             f"pass it as {key}=... (CLI: its own flag), not in the model kwargs")
    return kwargs


def architecture_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs that describe the network (recorded in `cfg.model_kwargs` and from there in SAE metadata):
    loading switches are the user's choice for this run, never recorded."""
    return {k: v for k, v in kwargs.items() if k not in LOADING_SWITCHES and k != "force_quick_gelu"}


__all__ = ["FAMILY_OPTIONS", "LOADING_SWITCHES", "SAFETY_SWITCHES", "architecture_kwargs", "check_file_model_kwargs", "check_kwarg_names",
           "check_user_model_kwargs", "family_of", "parse_model_kwargs"]
