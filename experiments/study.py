"""``study``: the paper's claims measured on your data, over seeds, each with an interval and a verdict.

For every seed it trains MAE (the baseline, with dense checkpoints), runs the paper's freeze
test on it (``freeze-test --grid``), derives a freezing schedule from its post-hoc convergence
and trains, with that schedule, MAE "freeze only", LayerLock and the ``latent_scheduled``
ablation, plus the naive-latent baseline; then it probes every encoder and a random-init encoder
of the same shape on the same clips. Everything is logged to MLflow; the study itself is one
more run (tag ``layerlock.study``, method ``study``) whose artifacts are ``results.json``,
``report.md`` and the Plotly figures (``analysis.study_figures``), also written to ``--out``.

Claims (each: the measured figure, its 95% t interval over seeds, a verdict):

- S0 pretraining matters: MAE minus random init, per probe metric, paired on the seed.
- S1 depth order: Spearman rho between depth and convergence step (position-controlled probes).
- S2 the cheap rules against the freeze test: rank agreement per rule; and whether freezing
  most blocks early costs more than the seed noise while freezing late does not.
- S3 compute: FLOP and wall-time saving of "freeze only" and LayerLock against MAE, with probe
  deltas.
- S4 collapse: the smallest per-block ``feat_std`` of naive latent, ``latent_scheduled``,
  LayerLock and MAE.

Each figure is an ``analysis.claims`` estimate. Verdicts: "held" when the interval lies on the
claimed side, "not held" when it lies on the other side, "inconclusive" when it contains the
threshold (with one seed there is no interval: "one seed"); paired probe differences read
"no difference" when their interval contains 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import LayerLockError
from core.schema import (
    METHOD_STUDY,
    STUDY,
    STUDY_DIR,
    TAG_GROUP,
    TAG_METHOD,
    TAG_STUDY,
    VARIANT_BLOCK,
    VARIANT_PREFIX_NO_STEM,
    VARIANT_STEM,
)
from experiments import CONFIGS, config_path

# Budgets: the base config and what the study sets on it. ``small`` fits a 2-core CPU in under
# 30 minutes for 3 seeds; ``full`` is the GPU size.
BUDGETS: dict[str, dict[str, Any]] = {
    # small: mae_tiny's own 600 steps; a 3 x 3 freeze-test grid (T = 100, 300, 500; L = 2, 4, 6);
    # no latent_scheduled ablation, and naive latent (a step costs 2.3 MAE steps; it collapses
    # within the first hundred) for half the steps: with either, 3 seeds took 33 minutes
    "small": {
        "config": "mae_tiny.yaml",
        "set": ["probe.every=30", "train.checkpoint_every=100"],
        "grid": {"n_steps": 3, "shallowest": False},
        "methods": ("freeze_only", "layerlock", "latent_naive"),
        "steps_fraction": {"latent_naive": 0.5},
        # block 0 alone at the grid's steps: on this workload the block that has not converged,
        # the reason every prefix costs the same (docs/freeze-test-variants.md); 3 children a seed
        "variants": {"block": (0,)},
    },
    "full": {
        "config": "mae_small.yaml",
        "set": ["probe.every=100", "train.checkpoint_every=500"],
        "grid": {},
        "methods": ("freeze_only", "layerlock", "latent_scheduled", "latent_naive"),
        "steps_fraction": {},
        "variants": {"block": (0,)},
    },
}
# Method -> (objective overrides, trained with the derived schedule?)
METHODS: dict[str, tuple[tuple[str, ...], bool]] = {
    "mae": ((), False),
    "freeze_only": ((), True),
    "layerlock": (("objective.name=layerlock",), True),
    "latent_scheduled": (("objective.name=latent_scheduled",), True),
    "latent_naive": (("objective.name=latent_naive", "objective.pixel_weight=0.0", "objective.latent_block=-1"), False),
}
# Collapse claim thresholds (fractions of MAE's feat_std): collapsed below, healthy above.
COLLAPSED_BELOW, HEALTHY_ABOVE = 0.2, 0.5


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


# ----------------------------------------------------------------------------- training stages


def _method_config(base, method: str, seed: int, schedule_path: Path | None, steps_fraction: float = 1.0):
    """``base`` turned into ``method`` for ``seed`` (with the seed's derived schedule if the method
    uses one), trained for ``steps_fraction`` of the base's steps."""
    from core.config import with_overrides

    overrides, scheduled = METHODS[method]
    extra = [
        *overrides,
        f"train.seed={seed}",
        f"tracking.run_name={method}-seed{seed}",
        f"freeze.schedule={schedule_path}" if scheduled else "freeze.schedule=null",
    ]
    if steps_fraction != 1.0:
        extra.append(f"train.steps={max(1, round(base.train.steps * steps_fraction))}")
    return with_overrides(base, extra, f"study ({method})")


def run_study(
    config: str | None,
    overrides: Sequence[str],
    seeds: Sequence[int],
    budget: str,
    out_dir: Path,
    uri: str | None,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
    study_id: str | None = None,
    executor: dict[str, Any] | None = None,
    variants: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train, test and evaluate everything; returns the results dict (also written to ``out_dir``).
    ``variants``: freeze-test variants (``stem``, ``prefix-no-stem``, ``block``) trained as well, at the
    grid's steps T (prefix-no-stem at its L's, block at block 0 and blocks L-1); their costs over seeds
    go to ``results["freeze_test_variants"]``. None: the budget's default, block 0 alone (the variant
    that explains why every prefix costs the same); ``()``: none.
    The runs train through :func:`experiments.executor.run_specs` (``executor``: its ``executor``/
    ``workers``/``ray_address``); a study run again with the same ``study_id`` keeps the runs that
    FINISHED."""
    from tqdm.auto import tqdm

    from core.config import load_config
    from core.readout import load_eval_data
    from experiments.demo import derive_demo_schedule
    from experiments.evaluate import evaluate_run, random_init_baseline
    from experiments.executor import run_specs, spec_for
    from experiments.freeze_test import freeze_test_specs, plan_from_run
    from experiments.seeds import seed_config

    if budget not in BUDGETS:
        raise LayerLockError(f"--budget must be one of {', '.join(BUDGETS)}, got '{budget}'")
    spec = BUDGETS[budget]
    # variant -> the x's it is trained at (None: derived from the grid's prefixes)
    cells: dict[str, tuple[int, ...] | None] = dict(spec["variants"]) if variants is None else dict.fromkeys(variants)
    base = load_config(
        config_path(config) if config else CONFIGS / spec["config"],
        [*spec["set"], "tracking.experiment=layerlock-study", *(overrides or [])],
    )
    if base.objective.name != "pixel":
        raise LayerLockError(
            "study: the base config must be an MAE (objective.name=pixel); the study derives the other methods from it"
        )
    study_id = study_id or time.strftime("study-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runs: dict[str, dict[int, str]] = {m: {} for m in ("mae", *spec["methods"])}
    schedules: dict[int, dict] = {}
    children: dict[int, list[str]] = {}

    def tags(method: str) -> dict[str, str]:
        return {TAG_STUDY: study_id, TAG_GROUP: f"{study_id}-{method}"}

    def method_spec(method: str, seed: int):
        cfg = _method_config(
            base, method, seed, schedules.get(seed, {}).get("path"), spec["steps_fraction"].get(method, 1.0)
        )
        return spec_for(cfg, f"{method} seed {seed}", tags(method), identity={**tags(method), "train.seed": str(seed)})

    # One call of the executor: every MAE, and, as each MAE finishes (``then``), its seed's
    # schedule is derived and its freeze-test grid and the other methods join the set: they train
    # while the other seeds' MAEs still do. The freeze test's tolerance (the MAEs' seed spread) is
    # only read in the analysis, once everything has trained.
    slots: dict[str, tuple[str, int]] = {}  # spec key -> (method, seed)

    def dependents(finished, result) -> list:
        """An MAE's dependents: its seed's freeze-test grid and other methods (none for other runs)."""
        method, seed = slots[finished.key]
        if method != "mae":
            return []
        mae = result.run_id
        steps, blocks, note = plan_from_run(mae, uri, **spec["grid"])
        if note:
            _say(f"[study] {note}")
        grid = freeze_test_specs(mae, steps, blocks, uri)
        for variant, xs in cells.items():
            if xs is None:
                # single blocks: block 0 (on the default workload the one that has not converged,
                # docs/freeze-test-variants.md) and the deepest block of each tested prefix
                xs = sorted({0} | {L - 1 for L in blocks}) if variant == VARIANT_BLOCK else blocks
            grid += freeze_test_specs(mae, steps, list(xs), uri, variant)
        path, sched = derive_demo_schedule(mae, uri, 0.95, 0, 0.75, out_dir / "schedules")
        schedules[seed] = {"path": path, "schedule": sched}
        methods = [method_spec(method, seed) for method in spec["methods"]]
        slots.update({s.key: ("freeze_test", seed) for s in grid})
        slots.update({s.key: (m, seed) for s, m in zip(methods, spec["methods"], strict=True)})
        others = ", ".join(spec["methods"])
        _say(f"[study] seed {seed}: MAE done; its freeze tests and {others}: {len(grid) + len(methods)} runs")
        return [*methods, *grid]  # the longest first: full-length runs, then T ascending

    _say(f"[study] MAE, seeds {', '.join(map(str, seeds))}, then each seed's freeze tests and methods")
    mae_specs = [method_spec("mae", s) for s in seeds]
    slots.update({s.key: ("mae", seed) for s, seed in zip(mae_specs, seeds, strict=True)})
    results = run_specs(mae_specs, uri=uri, desc="study runs", progress=progress, then=dependents, **(executor or {}))
    for result in results:
        method, seed = slots[result.key]
        if method == "freeze_test":
            children.setdefault(seed, []).append(result.run_id)
        else:
            runs[method][seed] = result.run_id
    runs = {m: {s: by[s] for s in seeds if s in by} for m, by in runs.items()}  # in the order of --seeds
    children = {s: children[s] for s in seeds if s in children}

    _say("[study] evaluate")
    data = load_eval_data(base, tasks, progress=False)
    evals: dict[str, dict[int, dict[str, float]]] = {m: {} for m in [*runs, "random_init"]}
    bar = tqdm(
        total=sum(map(len, runs.values())) + len(seeds) + 1,
        desc="study: evaluate",
        unit="encoder",
        position=0,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for method, by_seed in runs.items():
        for seed, rid in by_seed.items():
            evals[method][seed] = evaluate_run(rid, tasks, tracking_uri=uri, probe="both", data=data, progress=False)
            bar.update(1)
    for seed in seeds:
        evals["random_init"][seed] = random_init_baseline(
            seed_config(base, seed), tasks, probe="both", data=data, progress=False
        )
        bar.update(1)
    bar.set_postfix_str("analyse")
    results = analyse(runs, evals, schedules, uri, seeds)
    if cells:
        from analysis import io
        from analysis.agreement import variant_costs
        from analysis.compare import FINAL_LOSS_PARTS

        tests = [io.load_freeze_test(runs["mae"][s], uri, FINAL_LOSS_PARTS) for s in seeds]
        results["freeze_test_variants"] = variant_costs(tests).to_dict("records")
    results.update(
        {
            "study_id": study_id,
            "budget": budget,
            "seeds": list(seeds),
            "config": base.model_dump(mode="json"),
            "wall_s": time.perf_counter() - t_start,
            "probes": "position-controlled: every probe clip at the same token positions, each "
            "position's mean over clips removed before CKA, effective rank and feat_std",
            "eval_clips": {"train": int(len(data.train_video)), "val": int(len(data.val_video))},
            "runs": {m: {str(s): r for s, r in by.items()} for m, by in runs.items()},
            "freeze_test_children": {str(s): c for s, c in children.items()},
        }
    )
    bar.update(1)
    bar.close()
    write_outputs(results, out_dir)
    log_study_run(results, out_dir, uri, base.tracking.experiment)
    _say(f"[study] done in {results['wall_s'] / 60:.1f} min; report: {out_dir / 'report.md'}")
    return results


# ----------------------------------------------------------------------------- analysis


def _eval_keys(evals: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    keys: set[str] = set()
    for by_seed in evals.values():
        for metrics in by_seed.values():
            keys |= {k for k in metrics if "/block_" not in k}
    return sorted(keys)


def _lower_is_better(key: str) -> bool:
    return key.endswith("absrel")


def analyse(
    runs: dict[str, dict[int, str]],
    evals: dict[str, dict[int, dict[str, float]]],
    schedules: dict[int, dict],
    uri: str | None,
    seeds: Sequence[int],
) -> dict[str, Any]:
    """The claims S0-S4 from stored runs (read through ``analysis.io``, each figure an
    ``analysis.claims`` estimate with its verdict)."""
    from analysis import io
    from analysis.agreement import AGREEMENT_BASELINE_PARTS, agreement_report, freeze_grid
    from analysis.claims import claim, claim_verdict, difference, estimate, freeze_cost
    from analysis.compare import COMPARE_PARTS, FINAL_LOSS_PARTS, compare_runs
    from analysis.convergence import RULES, convergence_report

    claims: dict[str, Any] = {}
    keys = _eval_keys(evals)

    # S0 -------------------------------------------------------------------------------
    s0 = {}
    for key in keys:
        diffs = [
            evals["mae"][s][key] - evals["random_init"][s][key]
            for s in seeds
            if key in evals["mae"].get(s, {}) and key in evals["random_init"].get(s, {})
        ]
        s0[key] = {
            **claim(diffs, 0.0, "below" if _lower_is_better(key) else "above"),
            "mae": estimate([evals["mae"][s].get(key) for s in seeds]),
            "random_init": estimate([evals["random_init"][s].get(key) for s in seeds]),
        }
    claims["S0_pretraining_matters"] = {
        "claim": "MAE features probe better than a random-init encoder of the same shape",
        "figure": "MAE minus random init per probe metric, paired on the seed (absrel: lower is better)",
        "metrics": s0,
    }

    # S1 -------------------------------------------------------------------------------
    s1 = {}
    for rule in RULES:
        rhos, steps = [], {}
        for s in seeds:
            layer = io.load_layer_metrics(runs["mae"][s], uri)
            rep = convergence_report(layer, rule, run_id=runs["mae"][s])
            rhos.append(rep["spearman_rho"])
            steps[str(s)] = [b["converged_step"] for b in rep["blocks"]]
        s1[rule] = {
            **claim(rhos, 0.0, "above"),
            "metric": RULES[rule]["metric"],
            "threshold": RULES[rule]["threshold"],
            "undefined_seeds": sum(r is None for r in rhos),
            "steps": steps,
        }
    claims["S1_depth_order"] = {
        "claim": "shallow blocks converge before deep ones (Spearman rho of depth vs convergence step > 0)",
        "figure": "Spearman rho per rule on the MAE runs (rho undefined when fewer than 2 blocks converge or all tie)",
        "rules": s1,
        "verdict": s1["posthoc"]["verdict"],
    }

    # S2 -------------------------------------------------------------------------------
    tests = {
        s: io.load_freeze_test(runs["mae"][s], uri, FINAL_LOSS_PARTS, baseline_parts=AGREEMENT_BASELINE_PARTS)
        for s in seeds
    }
    reports = {s: agreement_report(tests[s]) for s in seeds}
    s2_rules = {}
    for rule in RULES:
        rows = [reports[s]["rules"].get(rule, {}) for s in seeds]
        sp = estimate([r.get("spearman_rho") for r in rows])
        s2_rules[rule] = {
            "spearman": sp,
            "kendall": estimate([r.get("kendall_tau") for r in rows]),
            "mean_abs_error": estimate([r.get("mean_abs_error") for r in rows]),
            "verdict": claim_verdict(sp, 0.0, "above"),
        }
    grids = {
        str(s): {
            "tested_steps": reports[s]["tested_steps"],
            "tested_blocks": reports[s]["tested_blocks"],
            "tolerance": reports[s]["tolerance"],
            "baseline_final_loss": reports[s]["baseline_final_loss"],
            "blocks": reports[s]["blocks"],
        }
        for s in seeds
    }
    tested = [freeze_grid(tests[s]) for s in seeds]
    cost = freeze_cost([grid.ratio for grid, _ in tested], [tol.tol for _, tol in tested])
    claims["S2_cheap_rules_vs_freeze_test"] = {
        "claim": "the cheap convergence rules rank blocks as the paper's freeze test does (rho > 0)",
        "figure": "Spearman/Kendall rank agreement with the freeze test per rule, over seeds",
        "rules": s2_rules,
        "freeze_test": grids,
        "freeze_cost": cost,
    }

    # S3 -------------------------------------------------------------------------------
    compared = tuple(m for m in ("mae", "freeze_only", "layerlock", "latent_scheduled", "latent_naive") if runs.get(m))
    loaded = io.load_runs([runs[m][s] for m in compared for s in seeds], uri, COMPARE_PARTS)
    by_id = compare_runs(loaded.values()).set_index("run_id")
    s3 = {}
    for method in ("freeze_only", "layerlock"):
        flop, wall = [], []
        for s in seeds:
            a, b = by_id.loc[runs["mae"][s]], by_id.loc[runs[method][s]]
            flop.append(1 - b["total_flops"] / a["total_flops"])
            wall.append(1 - b["wall_s"] / a["wall_s"])
        deltas = {}
        for key in keys:
            d = [
                evals[method][s][key] - evals["mae"][s][key]
                for s in seeds
                if key in evals[method].get(s, {}) and key in evals["mae"].get(s, {})
            ]
            deltas[key] = difference(d)
        predicted = (
            [schedules[s]["schedule"].get("predicted_flop_saving") for s in seeds] if method == "freeze_only" else None
        )
        s3[method] = {
            "flop_saving": claim(flop, 0.0, "above"),
            "wall_saving": claim(wall, 0.0, "above"),
            "predicted_flop_saving": estimate(predicted) if predicted else None,
            "probe_deltas": deltas,
        }
    claims["S3_compute"] = {
        "claim": "freezing on the derived schedule saves compute (saving > 0) without hurting the probes",
        "figure": "saving = 1 - cost / MAE's cost of the same seed; probe deltas = method minus MAE",
        "methods": s3,
        "schedules": {str(s): schedules[s]["schedule"] for s in seeds},
    }

    # S4 -------------------------------------------------------------------------------
    methods = tuple(m for m in ("mae", "layerlock", "latent_scheduled", "latent_naive") if runs.get(m))
    coll = by_id
    s4: dict[str, Any] = {}
    for m in methods:
        vals = [coll.loc[runs[m][s], "feat_std_min"] for s in seeds]
        ratio = [coll.loc[runs[m][s], "feat_std_min"] / coll.loc[runs["mae"][s], "feat_std_min"] for s in seeds]
        s4[m] = {
            "feat_std_min": estimate(vals),
            "ratio_to_mae": estimate(ratio),
            "eff_rank_mean": estimate([coll.loc[runs[m][s], "eff_rank_mean"] for s in seeds]),
        }
    s4["latent_naive"]["verdict"] = claim_verdict(s4["latent_naive"]["ratio_to_mae"], COLLAPSED_BELOW, "below")
    for m in [m for m in ("layerlock", "latent_scheduled") if m in s4]:
        s4[m]["verdict"] = claim_verdict(s4[m]["ratio_to_mae"], HEALTHY_ABOVE, "above")
    claims["S4_collapse"] = {
        "claim": f"naive latent prediction collapses (feat_std below {COLLAPSED_BELOW:.0%} of MAE's); LayerLock "
        f"does not (above {HEALTHY_ABOVE:.0%}); latent_scheduled shows what freezing adds",
        "figure": "smallest per-block feat_std at the last probe (position-controlled), and its ratio to MAE's "
        "of the same seed",
        "methods": s4,
    }
    return {
        "claims": claims,
        "interval": "95% t interval over seeds (Student's t, N-1 degrees of freedom)",
        "rule_defaults": {r: {k: v for k, v in RULES[r].items()} for r in RULES},
    }


# ----------------------------------------------------------------------------- outputs


def report_markdown(results: dict[str, Any]) -> str:
    from analysis.claims import format_estimate as fmt

    c = results["claims"]
    lines = [
        f"# LayerLock Lab study {results['study_id']}",
        "",
        f"- seeds: {', '.join(map(str, results['seeds']))} (N={len(results['seeds'])}); budget "
        f"`{results['budget']}`; {results['wall_s'] / 60:.1f} min",
        f"- data: `{results['config']['data']['name']}`, model depth {results['config']['model']['depth']}, "
        f"dim {results['config']['model']['dim']}, {results['config']['train']['steps']} steps",
        f"- probes: {results['probes']}",
        f"- intervals: {results['interval']}; verdict 'held' when the interval lies on the claimed side",
        f"- probe evaluation clips: {results['eval_clips']['train']} train / {results['eval_clips']['val']} val",
        "",
    ]

    s0 = c["S0_pretraining_matters"]
    lines += [
        "## S0 Pretraining matters",
        "",
        s0["claim"] + ".",
        "",
        "| probe metric | MAE | random init | MAE - random [95% CI] | verdict |",
        "|---|---|---|---|---|",
    ]
    for k, v in s0["metrics"].items():
        lines.append(f"| {k} | {v['mae']['mean']:.3f} | {v['random_init']['mean']:.3f} | {fmt(v)} | {v['verdict']} |")

    s1 = c["S1_depth_order"]
    lines += [
        "",
        "## S1 Depth order",
        "",
        s1["claim"] + ".",
        "",
        "| rule | metric | rho mean [95% CI] | undefined seeds | verdict |",
        "|---|---|---|---|---|",
    ]
    for r, v in s1["rules"].items():
        test = (
            f"relative change of {v['metric']} < {v['threshold']}"
            if r == "gradnorm"
            else f"{v['metric']} >= {v['threshold']}"
        )
        lines.append(f"| {r} | {test} | {fmt(v)} | {v['undefined_seeds']} | {v['verdict']} |")
    lines += [
        "",
        "Convergence steps (post-hoc), per seed: "
        + "; ".join(f"seed {s}: {st}" for s, st in s1["rules"]["posthoc"]["steps"].items()),
    ]

    s2 = c["S2_cheap_rules_vs_freeze_test"]
    lines += [
        "",
        "## S2 Cheap rules against the freeze test",
        "",
        s2["claim"] + ".",
        "",
        "| rule | Spearman [95% CI] | Kendall [95% CI] | mean abs step error | verdict |",
        "|---|---|---|---|---|",
    ]
    for r, v in s2["rules"].items():
        lines.append(
            f"| {r} | {fmt(v['spearman'])} | {fmt(v['kendall'])} | {fmt(v['mean_abs_error'])} | {v['verdict']} |"
        )
    fc = s2["freeze_cost"]
    lines += [
        "",
        "Freeze-test final-loss ratio (child / baseline), mean over seeds (rows L, columns T):",
        "",
        "| L \\ T | " + " | ".join(next(iter(fc["mean_ratio"].values()))) + " |",
        "|---" * (1 + len(next(iter(fc["mean_ratio"].values())))) + "|",
    ]
    for L, row in fc["mean_ratio"].items():
        lines.append(f"| {L} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")
    lines += [
        "",
        f"- seed noise (tolerance, relative sd of the baseline group's final loss): {fmt(fc['tolerance'], True)}",
        f"- freezing L={fc['early_deep']['L']} at T={fc['early_deep']['T']} costs {fmt(fc['early_deep'], True)}"
        f" -> {'more than' if fc['early_costs_more_than_noise'] else 'not more than'} the seed noise",
        f"- freezing L={fc['late_deep']['L']} at T={fc['late_deep']['T']} costs {fmt(fc['late_deep'], True)}"
        f" -> {'within' if fc['late_within_noise'] else 'beyond'} the seed noise",
        "- tolerance per seed: "
        + "; ".join(f"seed {s}: {g['tolerance']['line']}" for s, g in s2["freeze_test"].items()),
    ]

    s3 = c["S3_compute"]
    lines += [
        "",
        "## S3 Compute",
        "",
        s3["claim"] + ".",
        "",
        "| method | FLOP saving [95% CI] | predicted | wall saving [95% CI] | verdict (wall) |",
        "|---|---|---|---|---|",
    ]
    for m, v in s3["methods"].items():
        pred = fmt(v["predicted_flop_saving"], True) if v["predicted_flop_saving"] else "-"
        lines.append(
            f"| {m} | {fmt(v['flop_saving'], True)} | {pred} | {fmt(v['wall_saving'], True)} | "
            f"{v['wall_saving']['verdict']} |"
        )
    lines += [
        "",
        "Probe deltas against MAE (method - MAE):",
        "",
        "| method | metric | delta [95% CI] | verdict |",
        "|---|---|---|---|",
    ]
    for m, v in s3["methods"].items():
        for k, d in v["probe_deltas"].items():
            lines.append(f"| {m} | {k} | {fmt(d)} | {d['verdict']} |")

    s4 = c["S4_collapse"]
    lines += [
        "",
        "## S4 Collapse",
        "",
        s4["claim"] + ".",
        "",
        "| method | feat_std min [95% CI] | ratio to MAE [95% CI] | eff_rank mean | verdict |",
        "|---|---|---|---|---|",
    ]
    for m, v in s4["methods"].items():
        lines.append(
            f"| {m} | {fmt(v['feat_std_min'])} | {fmt(v['ratio_to_mae'])} | "
            f"{fmt(v['eff_rank_mean'])} | {v.get('verdict', '-')} |"
        )
    if results.get("freeze_test_variants"):
        lines += [
            "",
            "## Freeze-test variants",
            "",
            "Cost = child final loss / its own baseline's - 1, mean over seeds [95% t interval over seeds].",
            "",
            "| variant | cell | T | cost [95% CI] |",
            "|---|---|---|---|",
        ]
        for r in results["freeze_test_variants"]:
            ci = "" if r["low"] is None or math.isnan(r["low"]) else f" [{r['low']:+.2%}, {r['high']:+.2%}]"
            lines.append(f"| {r['variant']} | {r['cell']} | {r['T']} | {r['cost']:+.2%}{ci} |")
    lines += ["", "Figures: " + ", ".join(f"[{n}](figures/{n}.html)" for n in results.get("figures", []))]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out_dir: Path) -> None:
    """``results.json``, ``report.md`` and ``figures/*.html`` (plotly.js written once beside them)."""
    from analysis.__main__ import _jsonable
    from analysis.study_figures import study_figures

    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figs = study_figures(results)
    for name, fig in figs.items():
        # "directory": one plotly.min.js beside the pages, so they open offline.
        fig.write_html(fig_dir / f"{name}.html", include_plotlyjs="directory")
    results["figures"] = list(figs)
    (out_dir / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    (out_dir / "report.md").write_text(report_markdown(results))


def log_study_run(results: dict[str, Any], out_dir: Path, uri: str | None, experiment: str) -> str:
    """The study as one MLflow run (method ``study``): headline metrics and the outputs as artifacts."""
    from core.tracking import Tracker

    tracker = Tracker(
        uri=uri,
        experiment=experiment,
        run_name=results["study_id"],
        tags={TAG_STUDY: results["study_id"], TAG_METHOD: METHOD_STUDY},
    )
    c = results["claims"]
    headline = {f"{STUDY}s1_posthoc_rho": c["S1_depth_order"]["rules"]["posthoc"]["mean"]}
    for rule, v in c["S2_cheap_rules_vs_freeze_test"]["rules"].items():
        headline[f"{STUDY}s2_{rule}_spearman"] = v["spearman"]["mean"]
    tracker.log_metrics({k: float(v) for k, v in headline.items() if v is not None}, 0)
    tracker.log_params({"seeds": ",".join(map(str, results["seeds"])), "budget": results["budget"]})
    for name in ("results.json", "report.md"):
        tracker.log_artifact(out_dir / name, STUDY_DIR)
    for path in sorted((out_dir / "figures").iterdir()):
        tracker.log_artifact(path, f"{STUDY_DIR}/figures")
    tracker.finish()
    results["study_run_id"] = tracker.run_id
    return tracker.run_id or ""


# ----------------------------------------------------------------------------- command line


def cmd_study(args: argparse.Namespace) -> int:
    from experiments.executor import options
    from experiments.seeds import parse_seeds

    executor = options(args)
    seeds = parse_seeds(args.seeds)
    variants = None  # the budget's default
    if args.variants is not None:
        variants = [v.strip() for v in args.variants.split(",") if v.strip() and v.strip() != "none"]
        bad = [v for v in variants if v not in (VARIANT_STEM, VARIANT_PREFIX_NO_STEM, VARIANT_BLOCK)]
        if bad:
            raise LayerLockError(f"--variants {bad[0]}: unknown (any of stem, prefix-no-stem, block, or none)")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    out = Path(args.out) if args.out else Path("runs") / time.strftime("study-%Y%m%d-%H%M%S")
    progress = sys.stderr.isatty()
    if not progress:  # a file or CI log: stage lines, not progress-bar frames
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    results = run_study(
        args.config,
        args.set or [],
        seeds,
        args.budget,
        out,
        args.tracking_uri,
        tasks,
        progress=progress,
        study_id=out.name,
        executor=executor,
        variants=variants,
    )
    from experiments.demo import dashboard_link

    print(report_markdown(results))
    print(
        f"dashboard: streamlit run app/Home.py, then open {dashboard_link('study', study=results['study_id'])}"
        f"  (its claims; {dashboard_link('compare', study=results['study_id'])} compares its runs)"
    )
    print(results.get("study_run_id", ""))
    return 0


def register(sub, add_tracking) -> None:
    from experiments.executor import add_options as add_executor_options

    p = sub.add_parser(
        "study",
        help="the paper's claims on your data: seeds, freeze test, schedules, probes, "
        "intervals (report.md, results.json, figures)",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument(
        "--budget",
        choices=tuple(BUDGETS),
        default="small",
        help="small: mae_tiny (600 steps), a 3 x 3 freeze-test grid, under 30 min on a 2-core CPU; "
        "full: mae_small (GPU)",
    )
    p.add_argument("--config", default=None, help="base MAE config (default: the budget's); e.g. your data")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override on the base config (repeatable)")
    p.add_argument("--tasks", default=None, help="comma-separated probe tasks (default: all of the dataset)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/study-<time>); a study run again "
        "with the same --out trains only the runs it does not have yet",
    )
    p.add_argument(
        "--variants",
        default=None,
        metavar="stem,prefix-no-stem,block",
        help="also train these freeze-test variants at the grid's steps (block: block 0 and each tested "
        "prefix's deepest block); default: block 0 alone (3 children a seed), 'none' for no variant; "
        "the report lists each cell's cost with its 95%% interval over seeds",
    )
    add_executor_options(p)
    add_tracking(p)
    p.set_defaults(func=cmd_study)
