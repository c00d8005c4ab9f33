"""Pipeline bubble of the 1F1B, interleaved and GPipe schedules, measured on CPU with gloo against
the formulas of Narayanan et al. 2021: a bubble time fraction of ``(p - 1) / m`` for 1F1B (and for
GPipe, all forward then all backward) and ``(p - 1) / (v m)`` for the interleaved schedule with ``v``
chunks per rank.

Method: ``p`` gloo processes (one thread each) run ``schedules.run_schedule`` on the real orders
(``one_f_one_b_order``, ``interleaved_order``, ``all_forward_all_backward_order``) with the real
point-to-point messages of ``mpu.p2p``. Each stage's "compute" is an autograd function whose forward
waits ``t_f`` and whose backward waits ``t_b = 2 t_f`` (``--work sleep``, the default: the ranks then
do not compete for cores, so what is measured is the schedule and not how busy this machine is;
``--work spin`` busy-waits instead). With ``v`` chunks a chunk's forward takes ``t_f / v``, so every
rank does the same work ``m (t_f + t_b)`` under every schedule. Activations carry ``micro-batch +
virtual stage``, and each stage checks that it received the micro-batch the schedule says.

Per iteration (after a barrier), each rank records when it started and ended (``time.monotonic``,
one clock for all processes on Linux) and the time spent inside forward and backward (``busy``, the
``timers`` argument of ``run_schedule``); the iteration's wall time is the last end minus the first
start, a stage's idle time is ``wall - busy`` and its bubble fraction ``idle / busy``. The table gives
the median over ``--iters`` iterations (after ``--warmup``) of each stage's fraction: their mean and
range over stages; the fraction the same orders give in an exact replay with messages that take no
time (``simulated``: what the order itself costs; it equals the formula); the replay again with this
machine's message costs (``+messages``: the one-way time of a pipeline message and the time a receive
takes when its message is there already, both measured between ranks 0 and 1 before the schedules
run); the formula and measured / formula. The measured fraction is above the formula by about what
the messages cost: on a loaded machine a blocking gloo receive (header, then payload) costs
milliseconds even when the tensor has arrived, and the interleaved schedule receives ``v`` times as
often, so raise ``--forward-ms`` to bring the measurement nearer the formula.

    python bench/pipeline_bubble.py
    python bench/pipeline_bubble.py --forward-ms 50 --iters 5 --micro-batches 4,8,16,32
    python bench/pipeline_bubble.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mpu  # noqa: E402
from mpu import p2p  # noqa: E402
from schedules import (  # noqa: E402
    Op,
    all_forward_all_backward_order,
    interleaved_order,
    one_f_one_b_order,
    run_schedule,
)
from tests.distributed import run_distributed  # noqa: E402

SCHEDULES = ("1f1b", "interleaved", "gpipe")


def schedule_order(schedule: str, p: int, rank: int, m: int, v: int) -> list[Op]:
    """Rank ``rank``'s order of one iteration under ``schedule``."""
    if schedule == "1f1b":
        return one_f_one_b_order(p, rank, m)
    if schedule == "interleaved":
        return interleaved_order(p, rank, m, v)
    if schedule == "gpipe":
        return all_forward_all_backward_order(m)
    raise ValueError(f"unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")


def chunks_of(schedule: str, v: int) -> int:
    return v if schedule == "interleaved" else 1


def formula(schedule: str, p: int, m: int, v: int) -> float:
    """Narayanan et al. 2021's bubble time fraction: idle time over ideal compute time."""
    return (p - 1) / (chunks_of(schedule, v) * m)


def simulate(orders: list[list[Op]], forward_s: float, backward_s: float, latency_s: float = 0.0,
             receive_s: float = 0.0) -> list[float]:
    """Each rank's bubble fraction when ``orders`` run with forwards of ``forward_s``, backwards of
    ``backward_s``, messages that arrive ``latency_s`` after they are sent and receives that take
    ``receive_s`` when their message is there already, as ``run_schedule`` runs them: sends never wait,
    a receive waits for the matching send, each stream between two ranks is first in, first out.
    Raises ``RuntimeError`` on a deadlock or when a stage would receive another micro-batch's tensor."""
    p = len(orders)
    v = 1 + max(op.chunk for order in orders for op in order)
    last = p * v - 1
    streams: dict[tuple[str, int], list[tuple[float, int, int]]] = {}  # (kind, to rank): (arrival, stage, mb)
    position, free, busy = [0] * p, [0.0] * p, [0.0] * p
    progress = True
    while progress:
        progress = False
        for rank in range(p):
            while position[rank] < len(orders[rank]):
                op = orders[rank][position[rank]]
                stage = op.chunk * p + rank
                receives = stage > 0 if op.kind == "F" else stage < last
                needs = (op.kind, rank) if receives else None
                arrival = free[rank]
                if needs is not None:
                    queue = streams.get(needs, [])
                    if not queue:
                        break  # the sender has not got there yet
                    sent_at, sent_for, micro_batch = queue.pop(0)
                    arrival = max(sent_at, free[rank] + receive_s)
                    if (sent_for, micro_batch) != (stage, op.micro_batch):
                        raise RuntimeError(f"rank {rank} running {op} (stage {stage}) would receive the tensor of "
                                           f"stage {sent_for}, micro-batch {micro_batch}")
                duration = forward_s if op.kind == "F" else backward_s
                free[rank] = arrival + duration
                busy[rank] += duration
                arrives = free[rank] + latency_s
                if op.kind == "F" and stage < last:
                    streams.setdefault(("F", (rank + 1) % p), []).append((arrives, stage + 1, op.micro_batch))
                if op.kind == "B" and stage > 0:
                    streams.setdefault(("B", (rank - 1) % p), []).append((arrives, stage - 1, op.micro_batch))
                position[rank] += 1
                progress = True
    stuck = {rank: orders[rank][position[rank]] for rank in range(p) if position[rank] < len(orders[rank])}
    if stuck:
        raise RuntimeError(f"deadlock: ranks wait forever at {stuck}")
    wall = max(free)
    return [(wall - b) / b for b in busy]


class _Wait(torch.autograd.Function):
    """Identity plus one whose forward and backward take a set time (sleeping or spinning)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_s: float, backward_s: float, spin: bool) -> torch.Tensor:
        ctx.backward_s, ctx.spin = backward_s, spin
        _wait(forward_s, spin)
        return x + 1

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _wait(ctx.backward_s, ctx.spin)
        return grad, None, None, None


def _wait(seconds: float, spin: bool) -> None:
    if not spin:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class WaitStage(nn.Module):
    """A pipeline stage whose forward and backward take known times; its input must be micro-batch
    ``j``'s activations for this virtual stage (value ``j + stage``)."""

    def __init__(self, forward_s: float, backward_s: float, spin: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.forward_s, self.backward_s, self.spin = forward_s, backward_s, spin
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        self.input_tensor = tensor

    def forward(self, micro_batch: torch.Tensor) -> torch.Tensor:
        p = mpu.get_pipeline_model_parallel_world_size()
        stage = mpu.get_virtual_pipeline_model_parallel_rank() * p + mpu.get_pipeline_model_parallel_rank()
        x = micro_batch if mpu.is_pipeline_first_stage() else self.input_tensor
        if x is None or not torch.equal(x.detach(), micro_batch + stage):
            got = None if x is None else float(x.detach().flatten()[0])
            raise RuntimeError(f"stage {stage} got {got} for micro-batch {float(micro_batch[0])} "
                               f"(expected {float(micro_batch[0]) + stage})")
        return _Wait.apply(x * self.weight, self.forward_s, self.backward_s, self.spin)


def _forward_step(batch: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    output = model(batch)
    if mpu.is_pipeline_last_stage():
        return output.mean(), {}
    return output, {}


class _Timers:
    """``run_schedule``'s ``forward`` and ``backward`` timers summed into one busy time (its ``pipeline``
    timer, the time spent waiting for messages, is the idle time this benchmark measures by other means)."""

    def __init__(self) -> None:
        self.busy = 0.0
        self._started = 0.0
        self._counting = False

    def __call__(self, name: str) -> _Timers:
        self._counting = name in ("forward", "backward")
        return self

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> None:
        if self._counting:
            self.busy += time.perf_counter() - self._started


def message_costs(size: int, rounds: int = 12) -> tuple[float, float]:
    """Between ranks 0 and 1, the median one-way time of a pipeline message (``mpu.p2p``, header and
    payload; half a round trip) and the time a receive takes when its message is there already (rank 1
    waits 10 ms before it receives); the first rounds left out. Other ranks return zeros."""
    rank = mpu.get_pipeline_model_parallel_rank()
    if rank > 1:
        return 0.0, 0.0
    tensor, one_way, receive = torch.zeros(size), [], []
    for round_ in range(2 * (rounds + 2)):
        late = round_ >= rounds + 2
        start = time.perf_counter()
        if rank == 0:
            p2p.wait_all(p2p.send_forward(tensor))
            p2p.recv_backward(tensor.device)
            one_way.append((time.perf_counter() - start) / 2)
        else:
            if late:
                time.sleep(0.01)
            start = time.perf_counter()
            p2p.recv_forward(tensor.device)
            receive.append(time.perf_counter() - start)
            p2p.wait_all(p2p.send_backward(tensor))
    if rank == 0:
        return statistics.median(one_way[2:rounds + 2]), 0.0
    return 0.0, statistics.median(receive[rounds + 4:])


def measure_rank(settings: dict[str, Any]) -> dict[Any, Any]:
    """On each rank: ``{(schedule, m): [(start, end, busy) per measured iteration], "messages": (one-way
    latency, cost of a receive)}``."""
    import torch.distributed as dist

    p, v = settings["pipeline_size"], settings["virtual"]
    forward_s, backward_s = settings["forward_ms"] / 1000, settings["backward_ms"] / 1000
    rank = dist.get_rank()
    mpu.initialize_model_parallel(1, p)
    out: dict[Any, Any] = {"messages": message_costs(settings["message_size"])}
    for schedule in settings["schedules"]:
        chunks = chunks_of(schedule, v)
        mpu.destroy_model_parallel()
        mpu.initialize_model_parallel(1, p, chunks)
        model = WaitStage(forward_s / chunks, backward_s / chunks, settings["work"] == "spin")
        for m in settings["micro_batches"]:
            order = schedule_order(schedule, p, rank, m, v)
            batches = [torch.full((settings["message_size"],), float(j)) for j in range(m)]
            records = []
            for iteration in range(settings["warmup"] + settings["iters"]):
                timers = _Timers()
                dist.barrier()
                start = time.monotonic()
                run_schedule(order, _forward_step, batches, model, lambda loss: loss.backward(), timers)
                end = time.monotonic()
                model.weight.grad = None
                if iteration >= settings["warmup"]:
                    records.append((start, end, timers.busy))
            out[schedule, m] = records
    return out


def bubble_fractions(per_rank: list[list[tuple[float, float, float]]]) -> list[float]:
    """Each stage's median bubble fraction over the iterations; ``per_rank[r][i]`` is rank ``r``'s
    (start, end, busy) of iteration ``i``."""
    fractions: list[list[float]] = [[] for _ in per_rank]
    for iteration in zip(*per_rank):
        wall = max(end for _, end, _ in iteration) - min(start for start, _, _ in iteration)
        for rank, (_, _, busy) in enumerate(iteration):
            fractions[rank].append((wall - busy) / busy)
    return [statistics.median(values) for values in fractions]


def run(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Measure every schedule and micro-batch count of ``settings`` in ``pipeline_size`` gloo
    processes; one row per (schedule, m) with the per-stage measured, simulated and formula fractions."""
    p, v = settings["pipeline_size"], settings["virtual"]
    for schedule in settings["schedules"]:
        schedule_order(schedule, p, 0, 1 if schedule != "interleaved" else p, v)  # unknown names fail here
    if "interleaved" in settings["schedules"]:
        bad = [m for m in settings["micro_batches"] if m % p]
        if bad:
            raise ValueError(f"the interleaved schedule needs micro-batch counts divisible by {p}, not {bad}")
    results = run_distributed(measure_rank, p, settings, timeout=settings.get("timeout", 600))
    latency, receive = (max(result["messages"][i] for result in results) for i in (0, 1))
    rows = []
    for schedule in settings["schedules"]:
        chunks = chunks_of(schedule, v)
        for m in settings["micro_batches"]:
            measured = bubble_fractions([results[rank][schedule, m] for rank in range(p)])
            orders = [schedule_order(schedule, p, rank, m, v) for rank in range(p)]
            forward_s, backward_s = settings["forward_ms"] / 1000 / chunks, settings["backward_ms"] / 1000 / chunks
            rows.append({"schedule": schedule, "m": m, "chunks": chunks, "measured": measured,
                         "simulated": simulate(orders, forward_s, backward_s),
                         "with_latency": simulate(orders, forward_s, backward_s, latency, receive),
                         "formula": formula(schedule, p, m, v), "latency": latency, "receive": receive})
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pipeline-size", type=int, default=4, help="p: pipeline stages (processes)")
    parser.add_argument("--virtual", type=int, default=2, help="v: chunks per rank for the interleaved schedule")
    parser.add_argument("--micro-batches", default=[4, 8, 16], help="m values, comma-separated",
                        type=lambda text: [int(x) for x in text.split(",") if x.strip()])
    parser.add_argument("--schedules", default=list(SCHEDULES), help=f"comma-separated, of {', '.join(SCHEDULES)}",
                        type=lambda text: [x.strip() for x in text.split(",") if x.strip()])
    parser.add_argument("--forward-ms", type=float, default=30.0, help="t_f: one stage's forward of a micro-batch")
    parser.add_argument("--backward-ms", type=float, default=None, help="t_b (default 2 t_f)")
    parser.add_argument("--work", default="sleep", choices=["sleep", "spin"], help="how a stage spends t_f and t_b")
    parser.add_argument("--message-size", type=int, default=1024, help="floats per activation message")
    parser.add_argument("--iters", type=int, default=4, help="measured iterations per schedule and m")
    parser.add_argument("--warmup", type=int, default=1, help="iterations left out first")
    parser.add_argument("--quick", action="store_true", help="m = 4, 8 with t_f = 5 ms and 3 iterations")
    args = parser.parse_args()
    if args.quick:
        args.micro_batches, args.forward_ms, args.iters = [4, 8], 5.0, 3
    if args.backward_ms is None:
        args.backward_ms = 2 * args.forward_ms
    if args.pipeline_size < 2 or args.virtual < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("needs --pipeline-size >= 2, --virtual >= 1, --iters >= 1, --warmup >= 0")
    return args


def main() -> None:
    args = parse_args()
    settings = {key: getattr(args, key) for key in ("pipeline_size", "virtual", "micro_batches", "schedules",
                                                    "forward_ms", "backward_ms", "work", "message_size", "iters",
                                                    "warmup")}
    try:
        load = f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count() or 1} cores)"
    except OSError:
        load = ""
    print(f"pipeline bubble fraction (idle / compute per stage), p = {args.pipeline_size}, "
          f"t_f = {args.forward_ms:g} ms, t_b = {args.backward_ms:g} ms, {args.work}, "
          f"median of {args.iters} iterations{load}")
    began = time.monotonic()
    rows = run(settings)
    print(f"pipeline message between ranks 0 and 1: {rows[0]['latency'] * 1000:.2f} ms one way, "
          f"{rows[0]['receive'] * 1000:.2f} ms to receive one already there (+messages: the replay with these)")
    print(f"{'schedule':<16} {'m':>3} {'measured':>9} {'stages min-max':>15} {'simulated':>9} {'+messages':>9} "
          f"{'formula':>8} {'meas/formula':>12}")
    for row in rows:
        measured = statistics.fmean(row["measured"])
        name = f"{row['schedule']} v={row['chunks']}" if row["chunks"] > 1 else row["schedule"]
        spread = f"{min(row['measured']):.3f}-{max(row['measured']):.3f}"
        simulated, with_latency = statistics.fmean(row["simulated"]), statistics.fmean(row["with_latency"])
        print(f"{name:<16} {row['m']:>3} {measured:>9.3f} {spread:>15} {simulated:>9.3f} {with_latency:>9.3f} "
              f"{row['formula']:>8.3f} {measured / row['formula']:>11.2f}x")
    by_key = {(row["schedule"], row["m"]): statistics.fmean(row["measured"]) for row in rows}
    if "1f1b" in args.schedules and "interleaved" in args.schedules:
        ratios = ", ".join(f"m={m}: {by_key['interleaved', m] / by_key['1f1b', m]:.2f}x" for m in args.micro_batches)
        print(f"interleaved / 1F1B measured: {ratios} (formula {1 / args.virtual:.2f}x)")
    print(f"({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
