import pytest
import torch
import torch.distributed as dist

import mpu


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def single_process_group():
    """A gloo group of one (no port needed) with model parallelism of size 1."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mpu.initialize_model_parallel(1)
    try:
        yield
    finally:
        mpu.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_gpt2_run(tmp_path_factory) -> tuple[str, str]:
    """(folder, checkpoint) of one tiny GPT2 run saved at iterations 2 and 4, shared by the tests that only read
    it (copy it before changing anything); ``folder`` holds its corpus and vocabulary (``gpt2_args(folder)``)."""
    from tests.distributed import run_distributed
    from tests.helpers import gpt2_args, train_gpt2

    folder = tmp_path_factory.mktemp("tiny_gpt2_run")
    ckpt = str(folder / "ckpt")
    run_distributed(train_gpt2, 1, gpt2_args(folder, **{"--save": ckpt, "--train-iters": 4, "--save-interval": 2,
                                                         "--eval-iters": 0}))
    return str(folder), ckpt
