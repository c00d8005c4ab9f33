"""Every launcher in scripts/ hands its entry point flags that parse: run each with stand-in
``python``/``torchrun`` commands that record what they were given, then parse that."""

from __future__ import annotations

import glob
import importlib
import os

import pytest
import torch

from tests.helpers import recorded_launcher_calls

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "scripts", "pretrain_*.sh")))


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_flags_parse_and_extra_flags_are_appended(tmp_path, monkeypatch, script):
    from arguments import get_args
    from restore import decide_model_config

    calls = [argv for argv in recorded_launcher_calls(tmp_path, script) if any(a.startswith("pretrain_") for a in argv)]
    assert len(calls) == 1, calls
    argv = calls[0]
    entry = next(i for i, a in enumerate(argv) if a.startswith("pretrain_") and a.endswith(".py"))
    module = importlib.import_module(argv[entry][:-3])
    flags = argv[entry + 1:]
    if entry:  # torchrun: the world it would start
        world = int(argv[argv.index("--nproc_per_node") + 1]) * int(argv[argv.index("--nnodes") + 1])
        monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GPU launchers ask for nccl and fp16
    args = get_args(flags, defaults=getattr(module, "FLAG_DEFAULTS", None))
    assert args.log_interval == 7, "flags given to the launcher must reach the entry point"
    if "model_parallel" in script:
        assert args.model_parallel_size == 2 and args.data_parallel_size == 4
    if "tfrecords" in script:
        assert args.use_tfrecords and args.train_data == ["a.tfrecord", "b.tfrecord"]
        assert args.valid_data == ["v.tfrecord"]
    if "bert" in script:
        config = decide_model_config(args, 30522, model_defaults=module.model_defaults(args))
        assert args.max_preds_per_seq is not None and config.layernorm_epsilon == 1e-12
    if "bert" in script and "cpu" not in script:  # the 2019 BERT scripts' precision flags
        assert args.fp16 and args.fp32_layernorm and args.fp32_embedding


def test_every_bert_and_gpt2_launcher_is_covered():
    names = set(LAUNCHERS)
    for model in ("bert", "gpt2"):
        assert {f"pretrain_{model}.sh", f"pretrain_{model}_distributed.sh",
                f"pretrain_{model}_model_parallel.sh"} <= names
    assert {"pretrain_bert_tfrecords_distributed.sh", "pretrain_bert_sentencepiece.sh"} <= names
