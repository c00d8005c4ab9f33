"""The capacity planner (``capacity_planner.py``; ``tools/plan.py`` its command line) against what this
toolkit measures and what was published.

Memory: the planner's parameter, gradient and optimizer bytes equal ``performance.training_state_bytes``
after a real training step of GPT2 and BERT at tensor-parallel 1 and 2, data-parallel 1 and 2, fp32 and
bf16, with and without the distributed optimizer (two gloo processes); its activation estimate is within
ACTIVATION_TOLERANCE of the peak ``performance.SavedActivationMeter`` counts in a forward and backward
(tensor-parallel 1 and 2, with and without checkpointing and sequence parallelism). Time: calibrated on
one published row, the other rows and the 2019 seed's weak scaling within the tolerances the issue sets.
"""

from __future__ import annotations

import dataclasses
import shlex

import pytest
import torch

import capacity_planner as planner
import mpu
from arguments import build_parser, get_args
from initialize import run_main
from model import BERT_DEFAULTS, BertModel, GPT2Model
from performance import SavedActivationMeter, measure_allreduce_gbps, training_state_bytes
from restore import decide_model_config
from tests.distributed import run_distributed
from tests.helpers import load_tool
from training import setup_model_and_optimizer, train_step

plan = load_tool("plan")

VOCAB, SEQ, BATCH = 250, 32, 2
# (kind, tensor parallel, precision flag, distributed optimizer): each runs at a world of 2, so the first
# two are data-parallel 2 as well.
STATE_CASES = (("gpt2", 1, "--bf16", True), ("bert", 1, "--bf16", False), ("gpt2", 2, "--bf16", False),
               ("bert", 2, None, False), ("gpt2", 2, None, False))
# (tensor parallel, checkpointing, sequence parallel, dropout) of the activation measurements (GPT2, fp32).
# Without dropout CPU attention takes the fused path GPUs take; with it the unfused one that keeps the scores.
ACTIVATION_CASES = ((1, False, False, 0.0), (1, True, False, 0.0), (2, False, False, 0.0), (2, True, False, 0.0),
                    (2, False, True, 0.0), (2, False, False, 0.1))
# The issue asks for 20%; the fused path is counted tensor by tensor, the unfused CPU path keeps a few buffers
# of the scores more than its (3e + 1) bytes per score (about 10% of this tiny model's peak).
ACTIVATION_TOLERANCE = {0.0: 0.05, 0.1: 0.20}


def tiny_spec(kind: str) -> planner.ModelSpec:
    return planner.ModelSpec(kind, 3, 64, 4, SEQ, VOCAB, SEQ, divisible_by=8, dropout=0.0,
                             max_preds_per_seq=5 if kind == "bert" else 0)


def _flags(spec: planner.ModelSpec, tp: int, precision: str | None, sharded: bool) -> list[str]:
    flags = ["--num-layers", str(spec.num_layers), "--hidden-size", str(spec.hidden_size), "--num-attention-heads",
             str(spec.num_attention_heads), "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
             "--make-vocab-size-divisible-by", "8", "--micro-batch-size", str(BATCH), "--model-parallel-size",
             str(tp), "--device", "cpu", "--hidden-dropout", "0", "--attention-dropout", "0"]
    return flags + [f for f in (precision, "--use-distributed-optimizer" if sharded else None) if f]


def _forward_step(kind: str):
    def forward_step(batch, model):
        tokens = batch["text"]
        if kind == "gpt2":
            logits = model(tokens, torch.arange(SEQ).expand_as(tokens))
        else:
            logits, nsp = model(tokens, torch.zeros_like(tokens), torch.ones_like(tokens))
            logits = logits + nsp.sum() * 0  # the NSP head's parameters get gradients too
        loss = mpu.vocab_parallel_cross_entropy(logits.float(), tokens).mean()
        return loss, {"lm_loss": loss.detach()}

    return forward_step


def _held_after_a_step(kind: str, tp: int, precision: str | None, sharded: bool) -> dict[str, int]:
    spec = tiny_spec(kind)
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tp)
    mpu.model_parallel_cuda_manual_seed(3)
    args = get_args(_flags(spec, tp, precision, sharded))
    config = decide_model_config(args, VOCAB, model_defaults=BERT_DEFAULTS if kind == "bert" else None)
    provider = (lambda c: BertModel(c)) if kind == "bert" else (lambda c: GPT2Model(c))
    model, optimizer, scheduler = setup_model_and_optimizer(args, provider, config, torch.device("cpu"))
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    batches = iter([{"text": tokens}])
    _, _, skipped = train_step(_forward_step(kind), batches, model, optimizer, scheduler, args)
    assert not skipped
    return training_state_bytes(model, optimizer)


def _activation_peak(tp: int, checkpoint: bool, sequence_parallel: bool, dropout: float) -> int:
    spec = dataclasses.replace(tiny_spec("gpt2"), dropout=dropout)
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tp)
    mpu.model_parallel_cuda_manual_seed(3)
    config = dataclasses.replace(spec.config(tp), checkpoint_activations=checkpoint,
                                 sequence_parallel=sequence_parallel)
    model = GPT2Model(config)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with SavedActivationMeter(model.parameters()) as meter:
        logits = model(tokens, torch.arange(SEQ).expand_as(tokens))
        mpu.vocab_parallel_cross_entropy(logits, tokens).mean().backward()
    return meter.peak


def _measure_all() -> dict:
    return {"state": [_held_after_a_step(*case) for case in STATE_CASES],
            "activations": [_activation_peak(*case) for case in ACTIVATION_CASES],
            "rank": torch.distributed.get_rank()}


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    """Every measurement of this file, by rank, from one two-process run."""
    return run_distributed(_measure_all, 2)


@pytest.mark.parametrize("index", range(len(STATE_CASES)))
def test_parameter_gradient_and_optimizer_bytes_equal_the_measured_ones(measured, index):
    kind, tp, precision, sharded = STATE_CASES[index]
    name = {"--bf16": "bf16", None: "fp32"}[precision]
    rows = planner.stage_parameters(tiny_spec(kind), tp, 1, 0)
    for rank in measured:
        dp_rank = rank["rank"] // tp  # model-parallel groups are consecutive ranks
        predicted = planner.state_bytes(rows, name, 2 // tp, sharded, dp_rank)
        assert predicted == rank["state"][index], (STATE_CASES[index], dp_rank)


@pytest.mark.parametrize("index", range(len(ACTIVATION_CASES)))
def test_activation_estimate_is_within_tolerance_of_the_measured_peak(measured, index):
    tp, checkpoint, sequence_parallel, dropout = ACTIVATION_CASES[index]
    layout = planner.Layout(tp, 1, 2 // tp, BATCH, checkpoint=checkpoint, sequence_parallel=sequence_parallel)
    spec = dataclasses.replace(tiny_spec("gpt2"), dropout=dropout)
    predicted = planner.activation_bytes(spec, layout, 0, 1, 4, fused_attention=dropout == 0)
    peak = measured[0]["activations"][index]
    print(f"activations {ACTIVATION_CASES[index]}: predicted {predicted:.0f} B, measured {peak} B, "
          f"{100 * (predicted / peak - 1):+.1f}%")
    assert abs(predicted / peak - 1) <= ACTIVATION_TOLERANCE[dropout]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_the_one_layer_build_lists_the_parameters_of_the_full_model(kind):
    spec = tiny_spec(kind)
    for tp in (1, 2):
        assert planner.parameter_table(spec, tp) == planner.parameter_table(spec, tp, build_layers=0)


def test_pipeline_stages_split_the_layers_and_copy_the_tied_embeddings():
    spec = dataclasses.replace(tiny_spec("gpt2"), num_layers=4)
    table, word = planner.parameter_table(spec, 2)
    whole = sum(planner.stage_parameters(spec, 2, 1, 0))
    layer = sum(n for where, n in table if where == 0)
    stages = [sum(planner.stage_parameters(spec, 2, 4, s)) for s in range(4)]
    assert stages[1] == stages[2] == layer
    assert sum(stages) == whole + word  # the last stage's copy of the word embeddings
    assert stages[0] - layer == sum(n for where, n in table if where == planner.FIRST)


# --- the time model against the published rows ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows() -> list:
    return planner.check_rows()


def test_the_shipped_constant_is_the_fit_on_the_calibration_row():
    assert planner.fit_gemm_efficiency() == pytest.approx(planner.TimeConstants().gemm_efficiency, abs=2e-4)


def test_calibrated_on_one_row_the_other_rows_are_predicted_within_15_percent(rows):
    for index, check in enumerate(rows):
        print(f"{check.name}: published {check.published}, predicted {check.predicted:.1f} TFLOP/s per GPU "
              f"({100 * check.error:+.1f}%)")
        assert abs(check.error) <= (1e-3 if index == planner.CALIBRATION_ROW else planner.ROW_TOLERANCE), check.name


def test_the_planners_pick_on_each_rows_gpus_fits_and_is_at_least_as_fast(rows):
    for check in rows:
        assert check.pick_fits and check.pick_speedup >= 1.0, check.name


def test_the_seeds_weak_scaling_at_512_gpus_is_within_5_points():
    one, many = planner.seed_scaling()
    print(f"seed: {one:.1f} TFLOP/s on 1 V100, {many:.1f} per GPU on 512: {100 * many / one:.1f}% (published 76%)")
    assert abs(many / one - planner.SEED_EFFICIENCY) <= planner.EFFICIENCY_TOLERANCE


def test_gpt2_8p3b_on_512_v100s_rejects_what_does_not_fit_and_picks_what_does():
    spec, batch = planner.MODELS["gpt2-8.3b"]
    cluster = planner.CLUSTERS["v100-dgx2"]
    estimates = planner.plan(spec, cluster, 512, batch)
    unsplit = [est for est in estimates if est.layout.tp == est.layout.pp == 1]
    assert unsplit and not any(est.fits for est in unsplit)
    assert min(est.memory["total"] for est in unsplit) > 32 * planner.GIB  # 8.3B x 2 bytes of fp16 weights alone
    best = estimates[0]
    assert best.fits and best.memory["total"] <= planner.USABLE_MEMORY * 32 * planner.GIB
    assert all(best.step <= est.step for est in estimates if est.fits)


# --- the command line -------------------------------------------------------------------------------------------------


def run_plan(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        run_main(lambda: plan.main(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_best_layout_is_printed_as_a_command_whose_flags_the_toolkit_parses(capsys):
    code, out, _ = run_plan(["--model", "gpt2-345m", "--cluster", "a100-dgx", "--gpus", "16", "--top", "3"], capsys)
    assert code == 0
    table = out.split("best layout")[0].strip().splitlines()
    assert len(table) == 1 + 1 + 3 and "weights" in table[1] and "pipeline" in table[1]
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[:3] == ["torchrun", "--nnodes", "2"] and "pretrain_gpt2.py" in command  # two 8-GPU nodes
    flags = command[command.index("pretrain_gpt2.py") + 1:]
    assert "--pipeline-model-parallel-size" not in flags  # the flags of this branch: one stage
    parser = build_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    assert {flag for flag in flags if flag.startswith("--")} <= known  # whole names, not argparse's abbreviations
    parsed = parser.parse_args(flags)
    assert (parsed.num_layers, parsed.hidden_size, parsed.global_batch_size) == (24, 1024, 512)
    assert 16 % parsed.model_parallel_size == 0 and parsed.micro_batch_size in planner.MICRO_BATCHES


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5", "--cluster", "a100-dgx", "--gpus", "8"], "--model gpt5: unknown preset"),
    (["--model", "gpt2-345m", "--cluster", "tpu", "--gpus", "8"], "--cluster tpu: unknown preset"),
    (["--num-layers", "4", "--hidden-size", "100", "--num-attention-heads", "3", "--seq-length", "64",
      "--cluster", "a100-dgx", "--gpus", "8"], "--hidden-size 100 does not divide"),
    (["--model", "gpt2-8.3b", "--cluster", "v100-dgx2", "--gpus", "1"], "no layout fits in 32 GiB"),
    (["--model", "gpt2-345m", "--cluster", "a100-dgx"], "--gpus N"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(argv, message, capsys):
    code, out, err = run_plan(argv, capsys)
    assert code == 1 and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_calibrate_measures_this_machine_and_plans_for_it(capsys):
    code, out, _ = run_plan(["--model", "gpt2-345m", "--calibrate", "--gpus", "1", "--top", "2"], capsys)
    assert code == 0, out
    assert "this machine (measured)" in out and "fp32" in out and "--standalone --nproc_per_node 1" in out


@pytest.mark.slow
def test_the_all_reduce_bandwidth_is_measured_between_two_fresh_processes():
    assert 0.01 < measure_allreduce_gbps(2) < 10_000  # GB/s over gloo on this machine
