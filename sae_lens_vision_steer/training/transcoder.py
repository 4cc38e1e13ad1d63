"""Transcoder training on image tokens, as a SAELens training architecture.

SAELens ships transcoder *inference* classes (`Transcoder`: ReLU encoder from one hook, affine decoder to
another, `architecture="transcoder"`) but no training class. `TranscoderTrainingSAE` is SAELens'
`StandardTrainingSAE` (ReLU + L1 penalty on decoder-norm-weighted codes) with a decoder of width
`d_out`, trained to predict the output hook from the input hook. It is registered in SAELens' training
registry as `"transcoder"` (unless SAELens has registered its own), and its inference config is
SAELens' `TranscoderConfig`, so `save_inference_model` writes a folder `sae_lens.SAE.load_from_disk`
reads as a `Transcoder` (the splice runs it with `hook_name_out`).

Data: `paired_batches` zips two `activation_batches` streams of one activation store, one per hook,
with the same seed and rows. The stream is a function of the seed and the rows and shard bounds only,
which are the same for two hooks of one store, so row i of both batches is the same image token (checked
by the tests against the model's own MLP); the pair travels as one `[B, d_in + d_out]` tensor, as
SAELens' `multi_hook_concat_split_iter` packs transcoder input and output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from sae_lens import register_sae_training_class
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.transcoder import TranscoderConfig
from torch import nn

from ..activation_cache import ActivationStore, ShardMaps
from .batches import activation_batches

TRANSCODER_ARCHITECTURE = "transcoder"


@dataclass
class TranscoderTrainingSAEConfig(StandardTrainingSAEConfig):
    """`StandardTrainingSAEConfig` plus the output width; saved as SAELens' `TranscoderConfig`."""

    d_out: int = 0

    def __post_init__(self) -> None:
        if self.apply_b_dec_to_input:
            raise ValueError("apply_b_dec_to_input is not supported for transcoders (b_dec has width d_out)")
        if self.d_out < 1:
            raise ValueError(f"d_out must be a positive width, got {self.d_out}")
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return TRANSCODER_ARCHITECTURE

    def get_inference_config_class(self) -> type[SAEConfig]:
        return TranscoderConfig


class TranscoderTrainingSAE(StandardTrainingSAE):
    """ReLU transcoder: `codes = ReLU(x_in W_enc + b_enc)`, `x_out_hat = codes W_dec + b_dec`; loss
    `||x_out - x_out_hat||^2 + l1 * sum_i codes_i ||W_dec_i||` (SAELens' standard L1 penalty)."""

    cfg: TranscoderTrainingSAEConfig  # type: ignore[assignment]

    def initialize_weights(self) -> None:
        c = self.cfg
        kw = dict(dtype=self.dtype, device=self.device)
        w_dec = torch.empty(c.d_sae, c.d_out, **kw)
        nn.init.kaiming_uniform_(w_dec)
        if c.decoder_init_norm is not None:  # unit-norm (or the given norm) decoder rows
            w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * c.decoder_init_norm
        w_enc = torch.empty(c.d_in, c.d_sae, **kw)
        nn.init.kaiming_uniform_(w_enc)  # not W_dec^T: input and output are different spaces
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(c.d_out, **kw))
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(c.d_sae, **kw))

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """`step_input.sae_in` is `[B, d_in + d_out]`: the input hook's activation, then the target."""
        d_in = self.cfg.d_in
        x_in, x_out = step_input.sae_in[:, :d_in], step_input.sae_in[:, d_in:]
        feature_acts, hidden_pre = self.encode_with_hidden_pre(x_in)
        sae_out = self.decode(feature_acts)
        mse_loss = self.mse_loss_fn(sae_out, x_out.to(sae_out.dtype)).sum(dim=-1).mean()
        aux = self.calculate_aux_loss(step_input=dataclasses.replace(step_input, sae_in=x_in),
                                      feature_acts=feature_acts, hidden_pre=hidden_pre, sae_out=sae_out)
        losses = {"mse_loss": mse_loss, **aux}
        return TrainStepOutput(sae_in=x_out, sae_out=sae_out, feature_acts=feature_acts, hidden_pre=hidden_pre,
                               loss=sum(losses.values()), losses=losses)


def register_transcoder_architecture() -> None:
    if TRANSCODER_ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class(TRANSCODER_ARCHITECTURE, TranscoderTrainingSAE, TranscoderTrainingSAEConfig)


register_transcoder_architecture()


def is_transcoder_config(cfg_cls: type) -> bool:
    """A training config whose decoder writes another hook (it has a `d_out` field)."""
    return any(f.name == "d_out" for f in dataclasses.fields(cfg_cls))


def paired_batches(cache: ActivationStore, hook_in: str, hook_out: str, batch_size: int,
                   maps: tuple[ShardMaps, ShardMaps] | None = None, **kwargs: Any) -> Iterator[torch.Tensor]:
    """`[B, d_in + d_out]` batches: the same rows of `hook_in` and `hook_out`, shuffled alike. `maps`: the two
    hooks' `ShardMaps` when already opened (and checked). `kwargs` are `activation_batches`'s (rows, seed,
    buffer_size, skip_batches, device, prefetch, stats, stop); the loader statistics are collected on the
    input stream only."""
    stats = kwargs.pop("stats", None)
    src_in, src_out = maps if maps is not None else (cache, cache)
    a = activation_batches(src_in, hook_in, batch_size, stats=stats, **kwargs)
    b = activation_batches(src_out, hook_out, batch_size, **kwargs)
    try:
        for x_in, x_out in zip(a, b):
            yield torch.cat([x_in, x_out], dim=1)
    finally:
        a.close()
        b.close()


__all__ = ["TRANSCODER_ARCHITECTURE", "TranscoderTrainingSAE", "TranscoderTrainingSAEConfig", "is_transcoder_config",
           "paired_batches", "register_transcoder_architecture"]
