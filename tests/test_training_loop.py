"""Contracts of the training loop in ``training.py`` (issue 15, class 4).

Guards: evaluation runs every forward step with every module in eval mode (dropout off, so two
evaluations agree exactly) and without autograd, and hands the model back in train mode; a training
step runs in train mode even after the model was left in eval mode; in a real ``pretrain`` run every
validation forward is in eval mode and every training forward in train mode. Weight decay: for GPT2
and BERT, through the precision and data-parallel wrappers ``pretrain`` builds, the decayed group
holds exactly the weights that are neither a bias nor a LayerNorm parameter, the other group exactly
those, with ``--weight-decay`` and 0.0 respectively (also on the fp32 masters the optimizer updates).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mpu
from model import GPT2Model, TransformerConfig
from model.distributed import unwrap_model
from tests.helpers import gpt2_args

CONFIG = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                           max_sequence_length=16, hidden_dropout=0.5, attention_dropout=0.5)


def _recording_forward_step(log: list):
    """A GPT2 forward step that records the mode of every module and whether autograd is on."""

    def forward_step(batch, model):
        log.append(({m.training for m in model.modules()}, torch.is_grad_enabled()))
        tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(len(log) % 2))
        positions = torch.arange(12).unsqueeze(0).expand(2, 12)
        loss = mpu.vocab_parallel_cross_entropy(model(tokens[:, :-1], positions), tokens[:, 1:]).mean()
        return loss, {"lm_loss": loss.detach()}

    return forward_step


def test_evaluate_runs_in_eval_mode_without_grads_and_restores_train_mode(single_process_group):
    from model.distributed import DistributedDataParallel
    from training import evaluate, train_step

    mpu.model_parallel_cuda_manual_seed(2)
    model = DistributedDataParallel(GPT2Model(CONFIG))  # the wrapper pretrain uses (world of one)
    model.train()
    log: list = []
    forward_step = _recording_forward_step(log)
    first = evaluate(forward_step, lambda: None, model, eval_iters=2)
    assert log == [({False}, False)] * 2  # every module, the dropouts included, in eval mode; no autograd
    assert {m.training for m in model.modules()} == {True}, "evaluate must hand the model back in train mode"
    second = evaluate(forward_step, lambda: None, model, eval_iters=2)
    assert first == second and first["lm_loss"] > 0  # no dropout drawn: the same batches give the same loss
    # With dropout 0.5 a train-mode forward of the same batch differs: the comparison above is not vacuous.
    with torch.no_grad():
        train_losses = {forward_step(None, model)[0].item() for _ in range(2)}
    assert len(train_losses) == 2
    model.eval()  # left in eval mode (generation, a caller's own evaluation): a training step still trains
    log.clear()
    optimizer = SimpleNamespace(zero_grad=lambda set_to_none: None, backward=lambda loss: loss.backward(),
                                step=lambda max_norm, nonfinite: (1.0, True))
    train_step(forward_step, None, model, optimizer, None, SimpleNamespace(clip_grad=1.0))
    assert log == [({True}, True)]


def _pretrain_recording(argv: list[str], log: list) -> dict:
    """``training.pretrain`` for GPT2 in this process (a group of one), recording each forward's modes."""
    import torch.distributed as dist

    import pretrain_gpt2
    from arguments import get_args
    from training import pretrain

    def provider(args, tokenizer, device):
        step = pretrain_gpt2.forward_step_provider(args, tokenizer, device)

        def forward_step(batch, model):
            log.append(({m.training for m in model.modules()}, torch.is_grad_enabled()))
            return step(batch, model)

        return forward_step

    try:
        return pretrain(get_args(argv), pretrain_gpt2.model_provider, pretrain_gpt2.data_provider, provider)
    finally:
        mpu.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_pretrain_validates_in_eval_mode_and_trains_in_train_mode(tmp_path):
    log: list = []
    argv = gpt2_args(tmp_path, **{"--train-iters": 4, "--eval-interval": 2, "--eval-iters": 1,
                                  "--hidden-dropout": 0.1, "--attention-dropout": 0.1})
    results = _pretrain_recording(argv, log)
    assert results["iteration"] == 4 and "valid" in results and "test" in results
    train = [modes for modes, grad in log if grad]
    evaluation = [modes for modes, grad in log if not grad]
    assert train == [{True}] * 4
    assert evaluation == [{False}] * 4  # validation at 0, 2 and 4, then test at the end
    # Validation and training alternate: a training forward after each validation is in train mode again.
    assert [grad for _, grad in log] == [False, True, True, False, True, True, False, False]


# --- weight-decay groups ----------------------------------------------------------------------------


def _expected_no_decay(name: str) -> bool:
    return name.endswith("bias") or "layernorm" in name


@pytest.mark.parametrize("entry, flags", [
    ("pretrain_gpt2", {"--fp16": True, "--fp32-layernorm": True}),
    ("pretrain_gpt2", {}),
    ("pretrain_bert", {"--bf16": True}),
])
def test_weight_decay_groups_exclude_exactly_biases_and_layernorms(single_process_group, tmp_path, entry, flags):
    import importlib

    from arguments import get_args
    from model import optimizer_param_groups
    from restore import decide_model_config
    from training import setup_model_and_optimizer

    module = importlib.import_module(entry)
    argv = gpt2_args(tmp_path, **{"--weight-decay": 0.03, **flags})
    args = get_args(argv, defaults=getattr(module, "FLAG_DEFAULTS", None))
    defaults = module.model_defaults(args) if hasattr(module, "model_defaults") else None
    config = decide_model_config(args, 300, model_defaults=defaults)
    mpu.model_parallel_cuda_manual_seed(1)
    model, optimizer, _ = setup_model_and_optimizer(args, module.model_provider, config, torch.device("cpu"))
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    assert sum(n.endswith("bias") for n in names.values()) >= 8 and sum("layernorm" in n for n in names.values()) >= 8
    # optimizer_param_groups on the wrapped model (the names carry the wrappers' prefixes).
    decay, no_decay = optimizer_param_groups(model)
    decay_names = {names[id(p)] for _, p in decay}
    no_decay_names = {names[id(p)] for _, p in no_decay}
    assert no_decay_names == {n for n in names.values() if _expected_no_decay(n)}
    assert decay_names == {n for n in names.values() if not _expected_no_decay(n)}
    assert len(decay) + len(no_decay) == len(names)  # every parameter exactly once
    # The optimizer's groups, as it updates them (fp32 masters of half parameters).
    master_of = {id(m): names[id(p)] for p, m in zip(optimizer.model_params, optimizer.master_params, strict=True)}
    groups = {group["weight_decay"]: {master_of[id(m)] for m in group["params"]} for group in optimizer.param_groups}
    assert groups == {0.03: decay_names, 0.0: no_decay_names}


def test_the_skipped_iteration_count_survives_a_resume(tmp_path):
    """Weights of scale 1e20 make every loss non-finite, so every step is skipped (a fraction of 1 allowed):
    after 2 iterations and a resume for a third, the count is 3, not 1."""
    from tests.distributed import run_distributed
    from tests.helpers import read_metrics, train_gpt2

    save = str(tmp_path / "ckpt")
    flags = {"--init-method-std": "1e20", "--max-skipped-fraction": 1, "--eval-iters": 0, "--save": save}
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **flags, **{"--train-iters": 2,
                                                                    "--log-dir": str(tmp_path / "first")}))
    assert read_metrics(tmp_path / "first")[-1]["skipped_iters"] == 2
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **flags, **{"--train-iters": 3, "--load": save,
                                                                    "--log-dir": str(tmp_path / "resumed")}))
    last = read_metrics(tmp_path / "resumed")[-1]
    assert (last["iteration"], last["skipped_iters"]) == (3, 3)
