"""Performance visibility (issue 12): phase timers, model FLOPs, the peak used for MFU, memory in the logs."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import performance
from performance import GPU_PEAK_TFLOPS, Timers, model_flops_per_token, peak_memory_mb, peak_tflops
from tests.helpers import gpt2_args, read_metrics, run_gpt2_main, train_gpt2


def test_model_flops_count_every_matmul_weight_once(single_process_group):
    from model import BertModel, GPT2Model, TransformerConfig, bert_config

    config = TransformerConfig(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=384,
                               max_sequence_length=16, intermediate_size=96)
    model = GPT2Model(config)
    # Weights of matrix multiplies, counted from the model: 2-D parameters except the position table
    # (a lookup); the word embedding counts once, as the output projection onto the vocabulary.
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "position" not in n)
    assert model_flops_per_token(config, 16) == 6 * matmul + 12 * 3 * 16 * 32
    assert model_flops_per_token(config, 64) - model_flops_per_token(config, 16) == 12 * 3 * 48 * 32
    bert = BertModel(bert_config(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=384,
                                 max_sequence_length=16, intermediate_size=96))
    bert_matmul = sum(p.numel() for n, p in bert.named_parameters()
                      if p.dim() == 2 and "position" not in n and "tokentype" not in n)
    # BERT adds its pooler and the LM head's transform (h x h each) beyond the formula's stack: under 10%.
    assert 6 * bert_matmul * 0.9 < model_flops_per_token(config, 0) <= 6 * bert_matmul


def test_disabled_timers_report_nothing_and_enabled_ones_time_each_phase():
    off = Timers(False)
    off("forward").start()
    off("forward").stop()
    assert off.milliseconds_per_iteration(1) == {}
    on = Timers(True)
    for _ in range(2):
        on("sleep").start()
        time.sleep(0.02)
        on("sleep").stop()
        on("nothing").start()
        on("nothing").stop()
    ms = on.milliseconds_per_iteration(2)
    assert set(ms) == {"time_sleep_ms", "time_nothing_ms"}
    assert 18 <= ms["time_sleep_ms"] < 60 and ms["time_nothing_ms"] < 5
    assert on.milliseconds_per_iteration(2) == {"time_sleep_ms": 0.0, "time_nothing_ms": 0.0}  # reset


def test_peak_comes_from_the_flag_the_gpu_table_or_a_measured_matmul(monkeypatch):
    assert peak_tflops(torch.device("cpu"), "bf16", 123.0) == (123.0, "--peak-tflops")
    for name, precision, expected in (("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "fp16", 756.0),
                                      ("NVIDIA A100-SXM4-80GB", "fp32", 19.5), ("NVIDIA H200", "bf16", 989.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_tflops(torch.device("cuda", 0), precision)[0] == expected, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Unlisted GPU")
    assert peak_tflops(torch.device("cuda", 0), "bf16") == (None, "")  # no MFU rather than a guess
    assert all(any(p in peaks for p in ("bf16", "fp16")) for _, peaks in GPU_PEAK_TFLOPS)
    monkeypatch.setattr(performance, "_MEASURED", {})
    monkeypatch.setattr(performance, "measure_matmul_tflops", lambda dtype: {torch.float32: 0.25}[dtype])
    assert peak_tflops(torch.device("cpu"), "fp16") == (0.25, "a fp16 matrix multiply measured on this cpu")


def test_measured_matmul_rate_is_plausible():
    rate = performance.measure_matmul_tflops(torch.float32, size=256, seconds=0.05)
    assert 1e-4 < rate < 50  # TFLOP/s of a CPU: above a microcontroller's, below any CPU's fp32 peak


def test_peak_memory_is_the_process_peak():
    before = peak_memory_mb(torch.device("cpu"))["peak_rss_mb"]
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    after = peak_memory_mb(torch.device("cpu"))["peak_rss_mb"]
    assert before > 10 and after >= before and float(block[-1]) == 1.0


def _records(log_dir) -> list[dict]:
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"train"' in line]


def test_log_lines_and_metrics_carry_timings_flops_mfu_and_memory(tmp_path, capsys):
    timed, plain = str(tmp_path / "timed"), str(tmp_path / "plain")
    code, out, err = run_gpt2_main(gpt2_args(tmp_path, **{"--train-iters": 4, "--log-interval": 2, "--eval-iters": 0,
                                                          "--log-dir": timed, "--log-timers": True,
                                                          "--peak-tflops": 0.5}), capsys)
    assert code == 0, err
    assert " > MFU against 500.0 GFLOP/s per device (--peak-tflops)" in out  # below 1 TFLOP/s: not "0.0"
    assert " > memory after the first iteration: peak rss " in out
    line = [x for x in out.splitlines() if x.startswith(" iteration        4/")][0]
    assert "TFLOP/s per device" in line and "MFU" in line and "ms/iter: data" in line and "optimizer" in line
    record = _records(timed)[-1]
    phases = {f"time_{p}_ms" for p in ("data", "forward", "backward", "allreduce", "optimizer")}
    assert phases <= set(record) and all(record[k] >= 0 for k in phases)
    assert sum(record[k] for k in phases) <= 1000 * 2 * record["elapsed_s"]
    assert record["tflops_per_device"] > 0 and record["mfu"] == pytest.approx(record["tflops_per_device"] / 0.5)
    assert record["peak_rss_mb"] > 10
    code, out, err = run_gpt2_main(gpt2_args(tmp_path, **{"--train-iters": 2, "--log-interval": 2, "--eval-iters": 0,
                                                          "--log-dir": plain}), capsys)
    assert code == 0, err
    record = _records(plain)[-1]
    assert not any(k.startswith("time_") for k in record) and "mfu" not in record  # no peak asked for on CPU
    assert record["tflops_per_device"] > 0 and "MFU against" not in out


@pytest.mark.gpu
def test_cuda_timers_wait_for_the_device():
    timers = Timers(True, torch.device("cuda"))
    timers("sleep").start()
    torch.cuda._sleep(200_000_000)  # a kernel that spins ~0.1 s; without synchronisation the timer sees ~0
    timers("sleep").stop()
    assert timers.milliseconds_per_iteration(1)["time_sleep_ms"] > 20


def _losses_of(argv: list[str]) -> dict[int, float]:
    train_gpt2(argv)
    log_dir = argv[argv.index("--log-dir") + 1]
    return {r["iteration"]: r["lm_loss"] for r in read_metrics(log_dir)}


def test_compiled_layers_train_like_eager_with_model_parallel_and_checkpointing(tmp_path):
    from tests.distributed import run_distributed

    common = {"--train-iters": 2, "--eval-iters": 0, "--model-parallel-size": 2, "--checkpoint-activations": True,
              "--hidden-dropout": 0.1}
    eager = gpt2_args(tmp_path, **common, **{"--log-dir": str(tmp_path / "eager")})
    compiled = gpt2_args(tmp_path, **common, **{"--log-dir": str(tmp_path / "compiled"), "--compile": True,
                                                "--compile-backend": "aot_eager"})
    expected = run_distributed(_losses_of, 2, eager)[0]
    got = run_distributed(_losses_of, 2, compiled)[0]
    assert sorted(got) == sorted(expected) == [1, 2]
    for iteration in expected:  # dropout replayed through the checkpoint in the compiled graphs too
        assert got[iteration] == pytest.approx(expected[iteration], rel=1e-5), iteration


def test_compile_keeps_checkpoint_names(single_process_group):
    from model import GPT2Model, TransformerConfig
    from training import compile_layers

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                               max_sequence_length=8)
    model = GPT2Model(config)
    names = list(model.state_dict())
    assert compile_layers(model, "aot_eager") == 2
    assert list(model.state_dict()) == names
