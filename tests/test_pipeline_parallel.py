"""Pipeline parallelism (issue 25): the schedules, the stage models, and whole runs equal to the serial one.

A global batch of 16 (micro-batches of 4, fp32, no dropout, 4 layers) trains to the same losses and
gradient norms at pipeline size 2 and 4, pipeline 2 x tensor 2, pipeline 2 x data 2 and the interleaved
schedule with 2 virtual stages as on one process, for GPT2 and BERT; with fp16 the same iterations are
skipped; with activation checkpointing too. A pipelined run stopped and resumed equals the unbroken one
bitwise, and a PP2 x TP2 checkpoint resharded to one process generates the same greedy text and resumes
with the unbroken run's losses.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import mpu
from schedules import Op, all_forward_all_backward_order, interleaved_order, one_f_one_b_order
from tests.distributed import run_distributed
from tests.helpers import REPO, bert_args, gpt2_args, read_metrics, run_gpt2_cli, train_bert, train_gpt2

# --- the schedules ----------------------------------------------------------------------------------------------------


def _simulate(orders: list[list[Op]], chunks: int) -> int:
    """Run every rank's order with blocking receives and asynchronous sends; the number of rounds, or an
    AssertionError naming the ranks that wait on each other (a deadlock)."""
    p = len(orders)
    done: set[tuple[str, int, int]] = set()  # (kind, virtual stage, micro-batch)
    position = [0] * p
    rounds = 0
    while any(position[r] < len(orders[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            if position[r] == len(orders[r]):
                continue
            op = orders[r][position[r]]
            stage = op.chunk * p + r
            if op.kind == "F":
                ready = stage == 0 or ("F", stage - 1, op.micro_batch) in done
            else:
                ready = ("F", stage, op.micro_batch) in done and (
                    stage == p * chunks - 1 or ("B", stage + 1, op.micro_batch) in done)
            if ready:
                done.add((op.kind, stage, op.micro_batch))
                position[r] += 1
                progressed = True
        waiting = [orders[r][position[r]] for r in range(p) if position[r] < len(orders[r])]
        assert progressed, f"deadlock: ranks wait at {waiting}"
        rounds += 1
    return rounds


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 8), (4, 2)])
def test_1f1b_runs_every_micro_batch_once_holds_at_most_p_minus_r_and_never_deadlocks(p, m):
    orders = [one_f_one_b_order(p, r, m) for r in range(p)]
    for r, order in enumerate(orders):
        assert sorted(order) == sorted([Op("F", 0, j) for j in range(m)] + [Op("B", 0, j) for j in range(m)])
        live = peak = 0
        for op in order:
            live += 1 if op.kind == "F" else -1
            peak = max(peak, live)
        assert peak == min(p - r, m), (r, order)  # 1F1B's memory bound; GPipe would hold all m
    _simulate(orders, 1)
    _simulate([all_forward_all_backward_order(m) for _ in range(p)], 1)


@pytest.mark.parametrize("p, v, m", [(2, 2, 4), (4, 2, 8), (2, 3, 2), (4, 2, 4)])
def test_the_interleaved_order_covers_every_chunk_and_micro_batch_and_never_deadlocks(p, v, m):
    orders = [interleaved_order(p, r, m, v) for r in range(p)]
    expected = sorted(Op(kind, c, j) for kind in "FB" for c in range(v) for j in range(m))
    assert all(sorted(order) == expected for order in orders)
    interleaved_rounds = _simulate(orders, v)
    # The same work in v times smaller pieces finishes in fewer (piece-sized) rounds than v x plain 1F1B's.
    assert interleaved_rounds < v * _simulate([one_f_one_b_order(p, r, m) for r in range(p)], 1)
    with pytest.raises(ValueError, match="multiple of the pipeline size"):
        interleaved_order(p, 0, m + 1, v)


# --- groups and stages ------------------------------------------------------------------------------------------------


def _groups(tp: int, pp: int) -> dict:
    dist_rank = dist.get_rank()
    mpu.initialize_model_parallel(tp, pp)
    try:
        return {"rank": dist_rank, "tp": mpu.get_model_parallel_rank(), "dp": mpu.get_data_parallel_rank(),
                "pp": mpu.get_pipeline_model_parallel_rank(), "stages": list(mpu.get_pipeline_model_parallel_ranks()),
                "first": mpu.is_pipeline_first_stage(), "last": mpu.is_pipeline_last_stage(),
                "embedding": mpu.get_embedding_group() is not None,
                "dp_size": mpu.get_data_parallel_world_size()}
    finally:
        mpu.destroy_model_parallel()


def test_ranks_are_laid_out_tensor_fastest_then_data_then_pipeline():
    got = run_distributed(_groups, 4, 1, 2)  # tensor 1, pipeline 2, data 2
    assert [(g["tp"], g["dp"], g["pp"]) for g in got] == [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]
    assert [g["stages"] for g in got] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [(g["first"], g["last"]) for g in got] == [(True, False), (True, False), (False, True), (False, True)]
    assert all(g["embedding"] and g["dp_size"] == 2 for g in got)
    got = run_distributed(_groups, 4, 1, 4)
    assert [g["embedding"] for g in got] == [True, False, False, True]  # a middle stage holds no embeddings


def _stage_names(model_type: str, pp: int, virtual: int) -> dict:
    from conversion import stage_owns
    from model import BertModel, GPT2Model, bert_config
    from model.transformer import TransformerConfig

    mpu.initialize_model_parallel(1, pp, virtual)
    try:
        torch.manual_seed(7)
        shape = dict(num_layers=4, hidden_size=16, num_attention_heads=2, vocab_size=64, max_sequence_length=8)
        model = BertModel(bert_config(**shape)) if model_type == "bert" else GPT2Model(TransformerConfig(**shape))
        rank = mpu.get_pipeline_model_parallel_rank()
        mpu.destroy_model_parallel()
        mpu.initialize_model_parallel(1)  # collective: every rank builds the whole model too
        torch.manual_seed(7)
        whole = BertModel(bert_config(**shape)) if model_type == "bert" else GPT2Model(TransformerConfig(**shape))
        names = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        rule = [n for n in whole.state_dict() if stage_owns(n, model_type, 4, pp, rank, virtual)]
        return {"names": names, "rule": rule, "whole": whole.state_dict() if rank == 0 else None}
    finally:
        mpu.destroy_model_parallel()


@pytest.mark.parametrize("model_type, pp, virtual", [("gpt2", 2, 2), ("bert", 4, 1)])
def test_each_stage_holds_the_whole_models_parameters_it_owns_with_the_same_names_and_values(model_type, pp, virtual):
    got = run_distributed(_stage_names, pp, model_type, pp, virtual)
    whole = got[0]["whole"]
    union = set()
    for stage in got:
        assert sorted(stage["names"]) == sorted(n for n in whole if n in stage["names"])
        for name, tensor in stage["names"].items():
            assert torch.equal(tensor, whole[name]), name  # per-part seeds: the same weights on any stage
        union |= set(stage["names"])
    assert union == set(whole)
    # The conversion tools' ownership rule is the models' own (checked on the whole model's names).
    for rank in range(pp):
        assert set(got[rank]["rule"]) == set(got[rank]["names"]), rank


# --- whole runs -------------------------------------------------------------------------------------------------------

LAYOUTS = {
    "serial": (1, {}),
    "one_micro_batch": (1, {"--micro-batch-size": 16}),  # the global batch in one piece: a sum would differ
    "pp2": (2, {"--pipeline-model-parallel-size": 2}),
    "pp4": (4, {"--pipeline-model-parallel-size": 4}),
    "pp2_tp2": (4, {"--pipeline-model-parallel-size": 2, "--model-parallel-size": 2}),
    "pp2_dp2": (4, {"--pipeline-model-parallel-size": 2}),
    "pp2_interleaved": (2, {"--pipeline-model-parallel-size": 2, "--num-layers-per-virtual-pipeline-stage": 1}),
    "pp2_dp2_distributed_optimizer": (4, {"--pipeline-model-parallel-size": 2, "--use-distributed-optimizer": True}),
    "pp2_dp2_overlap": (4, {"--pipeline-model-parallel-size": 2, "--overlap-grad-reduce": True}),
    "pp2_tp2_sequence_parallel": (4, {"--pipeline-model-parallel-size": 2, "--model-parallel-size": 2,
                                      "--sequence-parallel": True}),
}


def _runs(tmp_path, model: str, names, extra: dict | None = None, iters: int = 20) -> dict[str, list[dict]]:
    build, train = (gpt2_args, train_gpt2) if model == "gpt2" else (bert_args, train_bert)
    records = {}
    for name in names:
        world, flags = LAYOUTS[name]
        log_dir = str(tmp_path / f"{model}_{name}")
        argv = build(tmp_path, **{"--batch-size": None, "--micro-batch-size": 4, "--global-batch-size": 16,
                                  "--num-layers": 4, "--train-iters": iters, "--eval-iters": 0, "--log-dir": log_dir,
                                  **flags, **(extra or {})})
        run_distributed(train, world, argv)
        records[name] = read_metrics(log_dir)
    return records


def _assert_same_run(records: dict[str, list[dict]], keys: list[str], rel: float = 1e-5, falls: bool = True) -> None:
    reference = records["serial"]
    assert not falls or reference[-1]["lm_loss"] < reference[0]["lm_loss"], "the loss should fall"
    for name, got in records.items():
        assert len(got) == len(reference), name
        for mine, theirs in zip(got, reference):
            for key in keys:
                assert mine[key] == pytest.approx(theirs[key], rel=rel, abs=1e-6), (name, mine["iteration"], key)


@pytest.mark.slow
def test_gpt2_pipelines_give_the_serial_losses(tmp_path):
    records = _runs(tmp_path, "gpt2", ["serial", "pp4", "pp2_tp2", "pp2_dp2", "pp2_interleaved"])
    _assert_same_run(records, ["lm_loss", "grad_norm"])


@pytest.mark.slow
def test_bert_pipelines_give_the_serial_losses(tmp_path):
    # pp2_dp2: the predicted tokens of the global batch are counted once, not once per stage
    records = _runs(tmp_path, "bert", ["serial", "pp4", "pp2_tp2", "pp2_dp2", "pp2_interleaved"], iters=10)
    _assert_same_run(records, ["lm_loss", "nsp_loss", "grad_norm"])


@pytest.mark.slow
def test_pipelines_combine_with_the_other_scale_features_and_evaluate_alike(tmp_path):
    evaluation = {"--eval-iters": 2, "--eval-interval": 3}
    records = _runs(tmp_path, "gpt2", ["serial", "pp2_dp2_distributed_optimizer", "pp2_dp2_overlap",
                                       "pp2_tp2_sequence_parallel"], evaluation, iters=6)
    _assert_same_run(records, ["lm_loss", "grad_norm"])
    # Validation (one data-parallel rank, so the same batches) runs through the stages forward only.
    valid = {name: [r["lm_loss"] for r in read_metrics(str(tmp_path / f"gpt2_{name}"), "valid")]
             for name in ("serial", "pp2_tp2_sequence_parallel")}
    assert len(valid["serial"]) == 3, valid  # before training, at 3 and at 6
    assert valid["pp2_tp2_sequence_parallel"] == pytest.approx(valid["serial"], rel=1e-5)


def test_pipelines_with_activation_checkpointing_and_fp16_skip_alike(tmp_path):
    records = _runs(tmp_path, "gpt2", ["serial", "pp2", "one_micro_batch"],
                    {"--checkpoint-activations": True, "--log-timers": True}, iters=6)
    _assert_same_run(records, ["lm_loss", "grad_norm"])
    # --log-timers shows the time a stage waited for the others' messages (none without a pipeline).
    assert "time_pipeline_ms" not in records["serial"][-1]
    assert all(r["time_pipeline_ms"] > 0 for r in records["pp2"])
    # fp16 from a loss scale that overflows: the same iterations are skipped on every stage.
    fp16 = {"--fp16": True, "--initial-loss-scale": float(2 ** 40)}
    (tmp_path / "fp16").mkdir()
    records = _runs(tmp_path / "fp16", "gpt2", ["serial", "pp2"], fp16, iters=6)
    skipped = {name: [r["skipped_iters"] for r in got] for name, got in records.items()}
    assert skipped["serial"] == skipped["pp2"] and skipped["serial"][-1] > 0, skipped
    _assert_same_run(records, ["lm_loss", "loss_scale"], rel=2e-3, falls=False)


def test_an_interleaved_pipelined_run_stopped_and_resumed_equals_the_unbroken_one(tmp_path):
    flags = {"--batch-size": None, "--micro-batch-size": 4, "--global-batch-size": 8, "--num-layers": 4,
             "--eval-iters": 0, "--train-iters": 6, "--save-interval": 3, "--pipeline-model-parallel-size": 2,
             "--num-layers-per-virtual-pipeline-stage": 1, "--resume-dataloader": True}
    whole = str(tmp_path / "whole")
    run_distributed(train_gpt2, 2, gpt2_args(tmp_path, **flags, **{"--log-dir": whole}))
    save, log = str(tmp_path / "ckpt"), str(tmp_path / "parts")
    run_distributed(train_gpt2, 2, gpt2_args(tmp_path, **flags, **{"--log-dir": log, "--save": save,
                                                                   "--exit-interval": 3}))
    assert sorted(os.listdir(os.path.join(save, "iter_0000003"))) == ["mp_rank_00_000", "mp_rank_00_001"]
    run_distributed(train_gpt2, 2, gpt2_args(tmp_path, **flags, **{"--log-dir": log, "--save": save, "--load": save}))
    keys = ("lm_loss", "grad_norm", "lr", "loss_scale")
    assert [[r[k] for k in keys] for r in read_metrics(log)] == [[r[k] for k in keys] for r in read_metrics(whole)]
    # Other layouts are refused in one line naming the tool that converts them.
    with pytest.raises(AssertionError, match="saved with 2 virtual stage"):
        run_distributed(train_gpt2, 2, gpt2_args(tmp_path, **{**flags, "--num-layers-per-virtual-pipeline-stage": None,
                                                               "--load": save, "--save": None}))
    proc = run_gpt2_cli(gpt2_args(tmp_path, **{**flags, "--pipeline-model-parallel-size": 1, "--load": save,
                                               "--save": None, "--num-layers-per-virtual-pipeline-stage": None}))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "pipeline size 2" in last and "--target-pipeline-model-parallel-size 1" in last, last


def _greedy(argv: list[str]) -> list[list[int]]:
    from arguments import distributed_settings, get_args
    from data_utils import make_tokenizer
    from generation import SamplingParams, generate
    from initialize import initialize_distributed
    from restore import load_gpt2_for_inference

    args = get_args(argv)
    device = initialize_distributed(**distributed_settings(args))
    tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir)
    model, _ = load_gpt2_for_inference(args, tokenizer, device, parallel_output=False)
    prompts = [tokenizer.encode("the quick brown"), tokenizer.encode("a")]
    return generate(model, prompts, max_new_tokens=6, context_length=16, params=SamplingParams(greedy=True),
                    vocab_size=tokenizer.vocab_size)


@pytest.mark.slow
def test_a_pp2_tp2_checkpoint_resharded_to_one_process_generates_and_resumes_alike(tmp_path):
    flags = {"--batch-size": None, "--micro-batch-size": 4, "--global-batch-size": 8, "--num-layers": 4,
             "--eval-iters": 0, "--train-iters": 6, "--resume-dataloader": True}
    whole = str(tmp_path / "whole")
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **flags, **{"--log-dir": whole}))
    save = str(tmp_path / "pp2tp2")
    run_distributed(train_gpt2, 4, gpt2_args(tmp_path, **flags, **{
        "--pipeline-model-parallel-size": 2, "--model-parallel-size": 2, "--save": save, "--exit-interval": 3}))
    single = str(tmp_path / "single")
    proc = subprocess.run(
        [sys.executable, "tools/reshard_checkpoint.py", "--load", save, "--save", single,
         "--target-model-parallel-size", "1", "--target-pipeline-model-parallel-size", "1"],
        cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(os.path.join(single, "iter_0000003")) == ["mp_rank_00"]
    # Greedy text: the pipelined checkpoint joined at load (at tensor 2) and the resharded one agree.
    shape = {"--num-layers": None, "--hidden-size": None, "--num-attention-heads": None}
    joined = run_distributed(_greedy, 2, gpt2_args(tmp_path, **shape, **{"--load": save, "--model-parallel-size": 2}))
    resharded = run_distributed(_greedy, 1, gpt2_args(tmp_path, **shape, **{"--load": single}))
    assert joined[0] == resharded[0] and any(joined[0])
    # Exported to Hugging Face from the pipelined checkpoint directly: the resharded one's tensors.
    from safetensors.torch import load_file

    for load, out in ((save, "hf_pipelined"), (single, "hf_single")):
        proc = subprocess.run(
            [sys.executable, "tools/hf_checkpoint.py", "export", "--load", load, "--hf-dir",
             str(tmp_path / out)], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    pipelined = load_file(str(tmp_path / "hf_pipelined" / "model.safetensors"))
    resharded_hf = load_file(str(tmp_path / "hf_single" / "model.safetensors"))
    assert pipelined.keys() == resharded_hf.keys()
    assert all(torch.equal(pipelined[k], resharded_hf[k]) for k in pipelined)
    # Resumed on one process, the run continues with the unbroken run's losses.
    log = str(tmp_path / "resumed")
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **flags, **{"--load": single, "--log-dir": log}))
    resumed, reference = read_metrics(log), read_metrics(whole)
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    for mine, theirs in zip(resumed, reference[3:]):
        assert mine["lm_loss"] == pytest.approx(theirs["lm_loss"], rel=1e-5)


@pytest.mark.parametrize("world, flags, fragment", [
    (2, {"--pipeline-model-parallel-size": 2, "--num-layers": 3}, "--num-layers 3 does not split into"),
    (2, {"--pipeline-model-parallel-size": 2, "--DDP-impl": "torch"}, "needs --DDP-impl local"),
    (2, {"--num-layers-per-virtual-pipeline-stage": 1}, "needs --pipeline-model-parallel-size 2 or more"),
    (2, {"--pipeline-model-parallel-size": 4}, "needs 4 processes"),
    (2, {"--pipeline-model-parallel-size": 2, "--num-layers-per-virtual-pipeline-stage": 1, "--global-batch-size": 4},
     "multiple of micro-batch x data-parallel x pipeline = 8"),
])
def test_pipeline_layouts_that_cannot_work_are_one_clear_error(tmp_path, monkeypatch, capsys, world, flags, fragment):
    from arguments import get_args

    for key, value in (("WORLD_SIZE", str(world)), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_:
        get_args(gpt2_args(tmp_path, **flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and fragment in err[0], err
