"""Data parallelism at realistic sizes (issue 15, class 2).

Guards: the local ``model.distributed.DistributedDataParallel`` with a bucket size small enough that a
GPT2 model's gradients form many buckets (some holding several tensors, some one) leaves every
gradient equal to the mean of the per-rank gradients over the data-parallel group, and only that
group: at data-parallel 4, at 2-way model x 2-way data parallelism, and with mixed bf16/fp32 gradients
(fp32 LayerNorm islands) under ``fp32_allreduce``; wrapping makes the replicas' weights identical.
And ``--resume-dataloader`` at data-parallel size 2 (per-rank batch 2, global batch 4): a run stopped
half way and resumed gives bitwise the losses of an unbroken run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import mpu
from model import GPT2Model, TransformerConfig
from model.distributed import DistributedDataParallel
from tests.distributed import run_distributed
from tests.helpers import gpt2_args, gpt2_losses, train_gpt2

CONFIG = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                           max_sequence_length=16, hidden_dropout=0.0, attention_dropout=0.0)
BUCKET = 2000  # elements: the 3072-element weights get a bucket each, biases and LayerNorms share some


def _dp_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(mpu.get_data_parallel_world_size())]
    dist.all_gather(parts, tensor.contiguous(), group=mpu.get_data_parallel_group())
    return parts


def _check_mean_gradients(mp: int, dtype: torch.dtype) -> dict:
    """Wrap a GPT2 model (seeded differently on every rank) and check the reduced gradients."""
    from fp16 import FP16_Module

    mpu.initialize_model_parallel(mp)
    try:
        mpu.model_parallel_cuda_manual_seed(100 + dist.get_rank())  # different weights before wrapping
        model = GPT2Model(CONFIG)
        if dtype != torch.float32:
            model = FP16_Module(model, dtype, keep_fp32=lambda name, m: isinstance(m, torch.nn.LayerNorm))
        ddp = DistributedDataParallel(model, fp32_allreduce=dtype != torch.float32, bucket_size=BUCKET)
        for name, param in model.named_parameters():  # the replicas start from the same weights
            for other in _dp_gather(param.detach()):
                assert torch.equal(other, param.detach()), f"weights of {name} differ between replicas"
        # Different data on every data-parallel rank, the same on the ranks of a model-parallel group.
        gen = torch.Generator().manual_seed(7 + mpu.get_data_parallel_rank())
        tokens = torch.randint(0, 64, (2, 13), generator=gen)
        positions = torch.arange(12).unsqueeze(0).expand(2, 12)
        logits = ddp(tokens[:, :-1], positions)
        mpu.vocab_parallel_cross_entropy(logits.float(), tokens[:, 1:]).mean().backward()
        params = [(n, p) for n, p in model.named_parameters()]
        local = {n: p.grad.detach().clone() for n, p in params}
        expected = {n: torch.stack([g.float() for g in _dp_gather(local[n])]).mean(0) for n, _ in params}
        buckets = ddp._buckets()
        ddp.allreduce_gradients()
        differs = 0
        for name, param in params:
            grad = param.grad.detach()
            assert grad.dtype == local[name].dtype, name
            tol = {"rtol": 1e-5, "atol": 1e-7} if grad.dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}
            torch.testing.assert_close(grad.float(), expected[name].to(grad.dtype).float(), **tol, msg=name)
            differs += not torch.equal(grad, local[name])
        return {"buckets": [len(b) for b in buckets], "dtypes": sorted({str(p.grad.dtype) for _, p in params}),
                "params": len(params), "differs": differs}
    finally:
        mpu.destroy_model_parallel()


def _ddp_worker() -> list[dict]:
    return [_check_mean_gradients(1, torch.float32), _check_mean_gradients(2, torch.float32),
            _check_mean_gradients(1, torch.bfloat16)]


def test_local_ddp_averages_every_gradient_over_the_data_parallel_group_in_many_buckets():
    """World 4: data-parallel 4 (fp32), model-parallel 2 x data-parallel 2 (fp32), data-parallel 4 with
    bf16 weights, fp32 LayerNorms and ``fp32_allreduce``."""
    for rank, runs in enumerate(run_distributed(_ddp_worker, 4)):
        for run in runs:
            assert len(run["buckets"]) >= 6 and max(run["buckets"]) >= 3 and min(run["buckets"]) == 1, (rank, run)
            assert sum(run["buckets"]) == run["params"], (rank, run)
            assert run["differs"] > run["params"] // 2, (rank, run)  # the reduction really changed gradients
        assert runs[2]["dtypes"] == ["torch.bfloat16", "torch.float32"], rank


# --- exact resume at data-parallel size 2 -----------------------------------------------------------


def _resume_worker(runs: list[list[str]], logs: dict[str, str]) -> dict:
    """An unbroken run, then the same run stopped at iteration 4 and resumed, in one process group."""

    unbroken, first, second = runs
    train_gpt2(unbroken)
    stopped = train_gpt2(first)
    train_gpt2(second)
    assert mpu.get_data_parallel_world_size() == 2 and mpu.get_model_parallel_world_size() == 1
    if dist.get_rank() != 0:
        return {}
    return {"unbroken": gpt2_losses(logs["unbroken"]), "resumed": gpt2_losses(logs["resumed"]),
            "stopped_at": stopped["iteration"]}


def test_resume_dataloader_at_data_parallel_2_matches_an_unbroken_run_bitwise(tmp_path):
    common = {"--batch-size": 2, "--train-iters": 8, "--eval-iters": 0, "--hidden-dropout": 0.1,
              "--attention-dropout": 0.1, "--resume-dataloader": True}
    logs = {name: str(tmp_path / name) for name in ("unbroken", "resumed")}
    ckpt = str(tmp_path / "ckpt")
    runs = [  # written here, once: the ranks only read the corpus and vocabulary files
        gpt2_args(tmp_path, **common, **{"--log-dir": logs["unbroken"]}),
        gpt2_args(tmp_path, **common, **{"--save": ckpt, "--exit-interval": 4, "--log-dir": logs["resumed"]}),
        gpt2_args(tmp_path, **common, **{"--save": ckpt, "--load": ckpt, "--log-dir": logs["resumed"]}),
    ]
    result = run_distributed(_resume_worker, 2, runs, logs)[0]
    expected, got = result["unbroken"], result["resumed"]
    assert result["stopped_at"] == 4
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    assert len(set(expected.values())) == 8  # the batches differ, so a replayed one would show
    for iteration in range(5, 9):
        assert got[iteration] == expected[iteration], iteration  # bitwise in fp32
