"""Loading a trained GPT2 checkpoint for inference: the shape comes from the checkpoint, mismatches fail clearly."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import gpt2_args, train_gpt2


def _load_each(argvs: list[list[str]]) -> list[tuple[str, object]]:
    """Load ``--load`` with each argv in turn; ("ok", what came back) or ("error", the message)."""
    from arguments import distributed_settings, get_args
    from data_utils import make_tokenizer
    from errors import CheckpointError
    from initialize import initialize_distributed
    from restore import load_gpt2_for_inference

    results = []
    for argv in argvs:
        args = get_args(argv)
        device = initialize_distributed(**distributed_settings(args))
        tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir)
        try:
            model, loaded = load_gpt2_for_inference(args, tokenizer, device)
        except CheckpointError as err:
            results.append(("error", str(err)))
            continue
        tokens = torch.arange(8).unsqueeze(0) % tokenizer.vocab_size
        with torch.no_grad():
            logits = model(tokens, torch.arange(8).unsqueeze(0))
        shape = (loaded.config.num_layers, loaded.config.hidden_size)
        results.append(("ok", (loaded.iteration, *shape, model.training, logits)))
    return results


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inference")
    save = str(folder / "ckpt")
    run_distributed(train_gpt2, 1, gpt2_args(folder, **{"--train-iters": 3, "--eval-iters": 0, "--save": save}))
    return folder, save


def _argv(folder, save, **overrides):
    flags = {"--load": save, "--num-layers": None, "--hidden-size": None, "--num-attention-heads": None,
             "--max-position-embeddings": None, **overrides}
    return gpt2_args(folder, **flags)


def test_shape_comes_from_the_checkpoint_and_mismatches_are_one_clear_error(checkpoint):
    folder, save = checkpoint
    errors = [
        ({"--num-layers": 3}, ["--num-layers 3", "--num-layers 2"]),
        ({"--max-position-embeddings": 32}, ["--max-position-embeddings 32", "16"]),
        ({"--tokenizer-type": "CharacterLevelTokenizer"}, ["vocabulary of 263 tokens", "has 260"]),
        ({"--load": "/nonexistent/ckpt"}, ["/nonexistent/ckpt", "no checkpoint"]),
        ({"--load": f"{save}/iter_0000003"}, ["inside a checkpoint", f"--load {save}"]),
    ]
    argvs = [_argv(folder, save), _argv(folder, save, **{"--num-layers": 2, "--hidden-size": 32})]
    argvs += [_argv(folder, save, **overrides) for overrides, _ in errors]
    results = run_distributed(_load_each, 1, argvs)[0]
    status, (iteration, layers, hidden, training, logits) = results[0]
    assert status == "ok" and iteration == 3 and (layers, hidden) == (2, 32) and not training
    assert results[1][0] == "ok"  # the checkpoint's own values may be given too, and build the same model
    torch.testing.assert_close(results[1][1][4], logits)
    for (status, message), (_, fragments) in zip(results[2:], errors, strict=True):
        assert status == "error" and "\n" not in message, message
        for fragment in fragments:
            assert fragment in message, message
