"""``bench freezing``: step time at k = 0..depth-1 frozen blocks against counted FLOPs.

Rounds interleaved across k (``timing.interleaved_timings``), so drift in machine load hits
every k alike; each k's ratio to k=0 is the median over rounds with a 95% interval, against
counted FLOPs; wall and CPU time. Rounds go on (up to a limit) until the intervals are within
``--within`` (1%), and it says when they are not.
Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

from experiments import config_path
from experiments.bench.timing import freezing_rows, interleaved_timings, interval_text, say_resolved


def bench_freezing(
    config: str,
    overrides: list[str] | None,
    batch_size: int,
    rounds: int,
    steps_per_round: int,
    warmup: int,
    max_rounds: int | None = None,
    within: float = 0.01,
) -> dict:
    """Step time at k = 0..depth-1 frozen blocks against counted FLOPs, in interleaved rounds.

    Each round times ``steps_per_round`` steps at every k (order reversed every other round) and
    keeps their median; a k's time ratio is the median over rounds of (round's k / round's k=0),
    with a 95% interval. Rounds go on past ``rounds`` until every ratio's interval is within
    ``within`` of it or ``max_rounds`` is reached. Wall time and the process's CPU time are both
    timed: on a machine shared with other jobs, CPU time is what a one-thread step costs,
    wall time also what the other jobs took from it.
    """
    import torch

    from core.config import load_config
    from core.data import build_dataset, get_batch
    from core.flops import count_step_flops
    from core.freezing import set_frozen_prefix
    from core.masking import tube_mask
    from core.model import build_model
    from core.objectives import compute_losses
    from core.train import build_optimizer

    cfg = load_config(config_path(config), overrides)
    depth = cfg.model.depth
    max_rounds = max(rounds, max_rounds or rounds)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.geometry)
    optimizer = build_optimizer(model, cfg)
    video, _ = get_batch(build_dataset(cfg.data, "train"), range(batch_size))
    keep, mask = tube_mask(batch_size, cfg.geometry.grid, cfg.model.mask_ratio, torch.Generator().manual_seed(0))

    def step() -> None:
        losses = compute_losses(model, model, video, keep, mask, cfg.objective)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timings = interleaved_timings(
        depth,
        lambda k: set_frozen_prefix(model, optimizer, k),
        step,
        rounds,
        steps_per_round,
        warmup,
        max_rounds,
        within,
        "bench freezing",
    )
    flops = [count_step_flops(cfg, batch_size, k) for k in range(depth)]
    rows = freezing_rows(timings, flops, within)
    return {
        "rows": rows,
        "rounds": timings["rounds"],
        "steps_per_round": steps_per_round,
        "batch_size": batch_size,
        "within": within,
        "resolved": all(row["resolved"] for row in rows),
    }


def print_freezing(result: dict) -> None:
    print(
        f"batch {result['batch_size']}, {result['rounds']} interleaved rounds of {result['steps_per_round']} "
        f"steps per k; ratios: median over rounds [95% interval]"
    )
    print(
        f"{'frozen':>6} {'step_ms':>8} {'GFLOP':>7} {'flops/k0':>8}  {'time/k0 [interval]':<24} "
        f"{'time/flops':>10}  {'cpu/k0 [interval]':<24} {'cpu/flops':>9}"
    )
    for r in result["rows"]:
        t = {"ratio": r["time_ratio"], "low": r["time_low"], "high": r["time_high"]}
        c = {"ratio": r["cpu_ratio"], "low": r["cpu_low"], "high": r["cpu_high"]}
        print(
            f"{r['frozen']:>6} {r['step_ms']:>8.2f} {r['flops'] / 1e9:>7.3f} {r['flop_ratio']:>8.3f}  "
            f"{interval_text(t):<24} {r['time_vs_flop']:>10.3f}  "
            f"{interval_text(c):<24} {r['cpu_vs_flop']:>9.3f}"
        )
    print(say_resolved(result["resolved"], result["within"], "wall-time ratio", "--max-rounds"))
