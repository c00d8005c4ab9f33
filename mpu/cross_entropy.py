"""Cross entropy over logits whose vocabulary dimension is split over the model-parallel group."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .initialize import get_model_parallel_group, group_rank, group_world_size
from .utils import VocabUtility


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """``loss = log(sum_v exp(z_v - m)) - (z_t - m)`` with ``m`` the global max over the vocabulary.

    Only three tensors of shape ``logits.shape[:-1]`` cross the group (max, target logit, sum of
    exponentials); the full-vocabulary logits are never built. Computed in fp32 whatever the
    input precision; the gradient comes back in the input's dtype.
    """

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, group):
        world_size = group_world_size(group)
        pg = get_model_parallel_group() if group is None else group
        logits = vocab_parallel_logits.float()

        # Subtract the global max so that exp never overflows.
        logits_max = logits.max(dim=-1).values
        if world_size > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=pg)
        logits = logits - logits_max.unsqueeze(-1)

        partition_vocab_size = logits.size(-1)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            partition_vocab_size, group_rank(group), world_size
        )
        target_mask = (target < vocab_start) | (target >= vocab_end)
        masked_target = (target - vocab_start).masked_fill(target_mask, 0)

        # The target's logit lives on exactly one rank; the others contribute zero.
        predicted_logits = logits.gather(-1, masked_target.unsqueeze(-1)).squeeze(-1)
        predicted_logits = predicted_logits.masked_fill(target_mask, 0.0)
        exp_logits = logits.exp_()
        sum_exp_logits = exp_logits.sum(dim=-1)
        if world_size > 1:
            stats = torch.stack([predicted_logits, sum_exp_logits])
            dist.all_reduce(stats, group=pg)
            predicted_logits, sum_exp_logits = stats[0], stats[1]

        loss = torch.log(sum_exp_logits) - predicted_logits

        softmax = exp_logits.div_(sum_exp_logits.unsqueeze(-1))
        ctx.input_dtype = vocab_parallel_logits.dtype
        ctx.save_for_backward(softmax, target_mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target = ctx.saved_tensors
        # d loss / d z_v = softmax_v - [v == target]
        grad_input = softmax.clone()
        on_this_rank = (~target_mask).to(grad_input.dtype)
        grad_input.scatter_add_(-1, masked_target.unsqueeze(-1), -on_this_rank.unsqueeze(-1))
        grad_input.mul_(grad_output.unsqueeze(-1))
        return grad_input.to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token cross entropy of vocabulary-parallel logits ``[..., V/p]`` against ``target [...]``.

    On a group of one the logits are the whole vocabulary, and torch's fused cross entropy computes
    the same thing with fewer passes over them.
    """
    if group_world_size(group) == 1:
        logits = vocab_parallel_logits.float()
        losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none")
        return losses.view(target.shape)
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, group)
