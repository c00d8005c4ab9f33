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
