import math

import pytest
import torch

from learning_rates import AnnealingLR


def _scheduler(style, warmup=10, decay_iters=110, min_lr=0.0):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.0)
    return optimizer, AnnealingLR(optimizer, start_lr=1.0, warmup_iter=warmup, num_iters=decay_iters,
                                  decay_style=style, min_lr=min_lr)


def _lr_at(style, iteration, **kwargs):
    optimizer, scheduler = _scheduler(style, **kwargs)
    for _ in range(iteration):
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "exponential"])
def test_warmup_rises_linearly_to_the_peak(style):
    assert _lr_at(style, 0) == 0.0
    assert _lr_at(style, 5) == pytest.approx(0.5)
    assert _lr_at(style, 10) == pytest.approx(1.0)


def test_decay_shapes_halfway_and_at_the_end():
    # Halfway through the 100 decay iterations after a warmup of 10.
    assert _lr_at("constant", 60) == pytest.approx(1.0)
    assert _lr_at("linear", 60) == pytest.approx(0.5)
    assert _lr_at("cosine", 60) == pytest.approx(0.5)
    assert _lr_at("exponential", 60) == pytest.approx(math.exp(-0.693 * 0.5))
    assert _lr_at("linear", 110) == pytest.approx(0.0)
    assert _lr_at("cosine", 200) == pytest.approx(0.0)  # stays at the floor after decay ends


def test_min_lr_is_the_floor():
    assert _lr_at("linear", 110, min_lr=0.1) == pytest.approx(0.1)
    assert _lr_at("cosine", 60, min_lr=0.1) == pytest.approx(0.55)


def test_state_dict_resumes_the_schedule():
    optimizer, scheduler = _scheduler("cosine")
    for _ in range(37):
        scheduler.step()
    optimizer2, resumed = _scheduler("cosine")
    resumed.load_state_dict(scheduler.state_dict())
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    scheduler.step()
    resumed.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    assert 0.0 < optimizer.param_groups[0]["lr"] < 1.0


def test_unknown_decay_style_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown --lr-decay-style 'square'"):
        _scheduler("square")
