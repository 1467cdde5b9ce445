"""``bench profile``: where one training step's time goes, by phase, by op and by module.

Runs the trainer's own step (``core.train``: this rank's batch and masks, forward and losses,
backward, gradient norm and clipping, optimizer update) at a fixed frozen prefix under
``torch.profiler`` and reports:

- phases: data+masking, forward+losses, backward, optimizer, the rest (norm, clip, zero_grad);
- ops: the top ``aten::`` ops by self CPU time in each phase;
- modules: forward time per top-level module (``blocks.3``, ``decoder_blocks.0``, heads), and
  what runs outside every module (patch embedding, targets, losses).

Backward time is reported per op only: autograd runs it outside the modules' calls.
A profile is a diagnosis, not a timing: the profiler adds its own overhead per op.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

PHASES = ("data+masking", "forward+losses", "backward", "optimizer", "other")


def _module_labels(model):
    """Forward hooks that open a ``record_function("module:NAME")`` around each leaf-level block."""
    from torch.autograd.profiler import record_function

    handles, open_ = [], {}
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    names += [f"decoder_blocks.{i}" for i in range(len(model.decoder_blocks))]
    names += ["norm", "decoder_embed", "decoder_norm", "pixel_head", "latent_head"]
    for name in names:
        module = model.get_submodule(name)

        def pre(mod, args, name=name):
            ctx = record_function(f"module:{name}")
            ctx.__enter__()
            open_.setdefault(name, []).append(ctx)

        def post(mod, args, out, name=name):
            open_[name].pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def profile_step(
    config: str, overrides: list[str] | None, batch_size: int, frozen: int | None, steps: int, warmup: int, top: int = 8
) -> dict:
    """Profile ``steps`` training steps (after ``warmup``) at ``frozen`` blocks frozen (default depth-1)."""
    import torch
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    import core.train as trainer
    from core.config import load_config
    from core.errors import LayerLockError
    from core.freezing import set_frozen_prefix
    from core.tracking import NullWriter
    from experiments import config_path

    cfg = load_config(
        config_path(config), [*(overrides or []), f"train.batch_size={batch_size}", "probe.enabled=false"]
    )
    depth = cfg.model.depth
    k = depth - 1 if frozen is None else frozen
    if not 0 <= k < depth:
        raise LayerLockError(f"--frozen must be between 0 and {depth - 1} (model.depth={depth}), got {k}")
    run = trainer._Run(cfg, NullWriter(), 0, 1)
    set_frozen_prefix(run.model, run.optimizer, k)
    run.stage = run.frozen = k
    run.net = run.model

    shard, losses_fn = run.shard, trainer.compute_losses

    def labelled_shard(step):
        with record_function("phase:data+masking"):
            return shard(step)

    def labelled_losses(*args, **kwargs):
        with record_function("phase:forward+losses"):
            return losses_fn(*args, **kwargs)

    run.shard = labelled_shard
    trainer.compute_losses = labelled_losses
    handles = _module_labels(run.model)
    walls: list[float] = []
    cpus: list[float] = []
    try:
        for s in range(warmup):
            run.update(s, False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for s in range(warmup, warmup + steps):
                with record_function("step"):
                    t0, c0 = time.perf_counter(), time.process_time()
                    run.update(s, False)
                    walls.append(time.perf_counter() - t0)
                    cpus.append(time.process_time() - c0)
    finally:
        trainer.compute_losses = losses_fn
        for h in handles:
            h.remove()

    phase_us: dict[str, float] = defaultdict(float)
    module_us: dict[str, float] = defaultdict(float)
    op_us: dict[tuple[str, str], float] = defaultdict(float)  # (phase, op) -> self time
    op_calls: dict[tuple[str, str], int] = defaultdict(int)
    step_us = 0.0
    for ev in prof.events():
        if ev.name == "step":
            step_us += ev.cpu_time_total
            for child in ev.cpu_children:
                phase_us[_phase_of(child.name)] += child.cpu_time_total
        elif ev.name.startswith("module:"):
            module_us[ev.name.removeprefix("module:")] += ev.cpu_time_total
        elif ev.name.startswith("aten::"):
            top_ev = ev
            while top_ev.cpu_parent is not None and top_ev.cpu_parent.name != "step":
                top_ev = top_ev.cpu_parent
            key = (_phase_of(top_ev.name), ev.name)
            op_us[key] += ev.self_cpu_time_total
            op_calls[key] += 1
    forward_us = phase_us["forward+losses"]
    module_us["(outside modules: embedding, targets, losses)"] = forward_us - sum(module_us.values())
    n = max(steps, 1)
    top_ops = {
        phase: [
            {"op": op, "self_ms": round(us / n / 1000, 2), "calls": op_calls[(ph, op)] // n}
            for (ph, op), us in sorted(op_us.items(), key=lambda kv: -kv[1])
            if ph == phase
        ][:top]
        for phase in PHASES
    }
    return {
        "frozen": k,
        "batch_size": batch_size,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "step_ms_unprofiled_median": round(statistics.median(walls) * 1000, 2),
        "step_cpu_ms_median": round(statistics.median(cpus) * 1000, 2),
        "step_ms_profiled": round(step_us / n / 1000, 2),
        "phases_ms": {p: round(phase_us[p] / n / 1000, 2) for p in PHASES},
        "modules_forward_ms": {m: round(v / n / 1000, 2) for m, v in module_us.items()},
        "top_ops": top_ops,
    }


def _phase_of(name: str) -> str:
    if name.startswith("phase:"):
        return name.removeprefix("phase:")
    if name.startswith("autograd::engine") or "backward" in name.lower():
        return "backward"
    if name.startswith("Optimizer."):
        return "optimizer"
    return "other"


def format_profile(result: dict) -> str:
    """Three small tables: phases, forward by module, top ops (milliseconds per step)."""
    lines = [
        f"frozen {result['frozen']}, batch {result['batch_size']}, {result['threads']} thread(s), "
        f"{result['steps']} steps: {result['step_ms_profiled']:.1f} ms/step under the profiler, "
        f"CPU time {result['step_cpu_ms_median']:.1f} ms/step median",
        "",
        "phase              ms/step",
    ]
    lines += [f"{p:<18} {v:>8.2f}" for p, v in result["phases_ms"].items()]
    lines += ["", "forward by module                               ms/step"]
    lines += [f"{m:<46} {v:>8.2f}" for m, v in result["modules_forward_ms"].items()]
    for phase, ops in result["top_ops"].items():
        if ops:
            lines += ["", f"{phase}: top ops by self time" + " " * (40 - len(phase)) + "ms/step  calls/step"]
            lines += [f"  {o['op']:<62} {o['self_ms']:>8.2f} {o['calls']:>10}" for o in ops]
    return "\n".join(lines)
