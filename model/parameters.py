"""How the optimizer sees a model's parameters."""

from __future__ import annotations

from torch import nn


def optimizer_param_groups(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """The named parameters with and without weight decay, in the order the optimizer numbers them
    (decay first); weight decay goes to weight matrices only, not to biases or LayerNorm.
    ``conversion`` reads a saved optimizer state by this order."""
    decay, no_decay = [], []
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(module, nn.LayerNorm) or name == "bias":
                no_decay.append((full, param))
            else:
                decay.append((full, param))
    return decay, no_decay
