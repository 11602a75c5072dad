"""Channel-level gradual pruning: the GMP schedule, but whole output channels (conv filters, neurons).

A channel's score is the root-mean-square of its weights (its L2 norm over √fan-in, so channels
of different layers compare fairly under a global distribution). A pruned channel's weight row
and its bias are masked, so the channel outputs exactly zero and structured shrinking can later
remove it. The last layer (the model's outputs) is left alone unless ``keep_output_layer=False``.
A BatchNorm after a pruned convolution still adds its shift: fold or remove it when shrinking.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.core.allocation import LayerInfo
from prunekit.core.masks import attach_mask, get_mask, pruned_count
from prunekit.errors import PrunekitError
from prunekit.training.base import SparseLayer, drop_lowest, select_layers
from prunekit.training.method import SPARSIFIERS
from prunekit.training.methods.gmp import GMP, GMPMethod

CHANNEL_DISTRIBUTIONS = ("uniform", "global", "lamp")


@SPARSIFIERS.register("channel_gmp")
class ChannelGMPMethod(GMPMethod):
    """GMP's schedule, and whether the output layer (the model's outputs) is left whole."""

    keep_output_layer: bool = True


class ChannelGMP(GMP):
    method_class = ChannelGMPMethod

    def prepare(self) -> None:
        # ER and ERK size a layer's density by its weight shape; here a layer's units are its channels
        if self.distribution.name not in CHANNEL_DISTRIBUTIONS:
            raise PrunekitError(f"{self.name}: distribution '{self.distribution.name}' does not apply to channels; "
                                f"use one of {', '.join(CHANNEL_DISTRIBUTIONS)}")
        super().prepare()

    def derived_settings(self) -> dict:
        return {"unit": "output channel"}

    def _select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        layers = select_layers(model, self.include, self.exclude, self.name)
        if self.method.keep_output_layer:
            layers = layers[:-1]
        if not layers:
            raise PrunekitError(f"{self.name}: only the output layer is left to prune; pass keep_output_layer=False")
        for name, module in layers:
            if module.bias is not None and get_mask(module, "bias") is None:
                attach_mask(module, torch.ones_like(module.bias, dtype=torch.bool), "bias")
        return layers

    def channel_scores(self) -> dict[str, torch.Tensor]:
        scores = {}
        for layer in self.layers:
            rows = layer.weight.detach().reshape(layer.shape[0], -1).float()
            scores[layer.name] = rows.pow(2).mean(dim=1).sqrt()
        return scores

    def channel_mask(self, layer: SparseLayer) -> torch.Tensor:
        return layer.mask.reshape(layer.shape[0], -1).any(dim=1)

    def prune_to(self, sparsity: float, event: str) -> None:
        scores = self.channel_scores()
        infos = [LayerInfo(layer.name, (layer.shape[0],)) for layer in self.layers]
        score_fn = (lambda name: scores[name]) if "scores" in self.distribution.needs else None
        sparsities = self.distribution.allocate(infos, sparsity, score_fn)
        masks = {}
        for layer in self.layers:
            current = self.channel_mask(layer)
            channels = layer.shape[0]
            count = max(pruned_count(channels, sparsities[layer.name]), channels - int(current.sum()))
            keep = drop_lowest(scores[layer.name].masked_fill(~current, -float("inf")), count)
            masks[layer.name] = keep.reshape(-1, *([1] * (len(layer.shape) - 1))).expand(layer.shape).clone()
        self.apply_masks(masks, event)

    # The bias follows its channel's mask.
    def _bias_mask(self, layer: SparseLayer):
        return get_mask(layer.module, "bias")

    def _write_mask(self, layer: SparseLayer, mask: torch.Tensor) -> None:
        super()._write_mask(layer, mask)
        bias = self._bias_mask(layer)
        if bias is not None:
            keep = mask.reshape(layer.shape[0], -1).any(dim=1)
            changed = keep ^ bias.mask
            if changed.any():
                original = layer.module.parametrizations["bias"].original
                with torch.no_grad():
                    original.masked_fill_(changed, 0)
                self._reset_optimizer_state(original, changed)
                bias.mask.copy_(keep)

    @torch.no_grad()
    def enforce_masks(self) -> None:
        super().enforce_masks()
        for layer in self.layers:
            bias = self._bias_mask(layer)
            if bias is not None:
                layer.module.parametrizations["bias"].original.masked_fill_(~bias.mask, 0)

    def _after_squash(self, layer: SparseLayer) -> None:
        if parametrize.is_parametrized(layer.module, "bias"):
            parametrize.remove_parametrizations(layer.module, "bias", leave_parametrized=True)

    def pruned_channels(self) -> dict[str, int]:
        return {layer.name: int((~self.channel_mask(layer)).sum()) for layer in self.layers}
