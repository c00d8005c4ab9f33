"""bench/pipeline_bubble.py: its exact replay of the schedules gives the bubble formulas, it catches a
stage receiving another micro-batch and a deadlock, and the measured bubble (4 gloo processes whose
stages sleep a set time) is near the formula, smaller for the interleaved schedule than for 1F1B."""

from __future__ import annotations

import statistics

import pytest

from bench.pipeline_bubble import formula, run, schedule_order, simulate
from schedules import Op, no_pipelining_order


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_replay_of_the_orders_gives_the_formulas(p: int) -> None:
    for schedule, chunk_counts in (("1f1b", [1]), ("gpipe", [1]), ("interleaved", [2, 3, 4])):
        for v in chunk_counts:
            for m in (p, 2 * p, 4 * p):
                orders = [schedule_order(schedule, p, rank, m, v) for rank in range(p)]
                chunks = v if schedule == "interleaved" else 1
                for fraction in simulate(orders, 1.0 / chunks, 2.0 / chunks):
                    assert fraction == pytest.approx(formula(schedule, p, m, v)), (schedule, p, m, v)


def test_replay_catches_a_wrong_micro_batch_and_a_deadlock() -> None:
    orders = [schedule_order("1f1b", 2, rank, 4, 1) for rank in range(2)]
    first, second = orders[1].index(Op("F", 0, 1)), orders[1].index(Op("F", 0, 2))
    orders[1][first], orders[1][second] = orders[1][second], orders[1][first]
    with pytest.raises(RuntimeError, match="would receive the tensor of stage 1, micro-batch 1"):
        simulate(orders, 1.0, 2.0)
    # Rank 0 waits for micro-batch 0's gradient before sending micro-batch 1; rank 1 sends that
    # gradient only after micro-batch 1's forward.
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate([no_pipelining_order(2), schedule_order("gpipe", 2, 1, 2, 1)], 1.0, 2.0)


@pytest.mark.slow
def test_measured_bubble_near_the_formula_and_interleaved_below_1f1b() -> None:
    settings = {"pipeline_size": 4, "virtual": 2, "micro_batches": [4], "schedules": ["1f1b", "interleaved"],
                "forward_ms": 50.0, "backward_ms": 100.0, "work": "sleep", "message_size": 64, "iters": 2,
                "warmup": 1}
    # Long stages: every receive costs milliseconds on a loaded machine, and the interleaved schedule
    # has more of them on its critical path; the bubbles differ by (p - 1)(t_f + t_b) / 2 = 225 ms.
    rows = {(row["schedule"], row["m"]): row for row in run(settings)}
    assert set(rows) == {("1f1b", 4), ("interleaved", 4)}
    measured = {key: statistics.fmean(row["measured"]) for key, row in rows.items()}
    for key, row in rows.items():
        assert len(row["measured"]) == 4
        # Never much below what the order itself costs; message latency on a busy machine only adds.
        assert measured[key] > 0.8 * row["formula"], (key, measured[key], row["formula"])
        assert measured[key] < 3.0 * row["formula"] + 0.3, (key, measured[key], row["formula"])
    assert measured["interleaved", 4] < measured["1f1b", 4], measured
