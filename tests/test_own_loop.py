"""Bring your own model: LayerMonitor, freeze_prefix/apply_schedule and the FLOP model on models
this project did not write (torchvision's VisionTransformer and video ResNet), in a plain loop
(experiments/examples/own_loop.py, the README's example), then the analysis and the pages."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import schema
from core.errors import LayerLockError, ScheduleError
from core.flops import count_flop_model
from core.freezing import FreezeSchedule, apply_schedule, freeze_prefix, frozen_prefix_length
from core.monitor import CostSpec, LayerMonitor, NullWriter, ProbeSpec, open_writer
from core.probes import clips_positions_dim
from experiments.examples import own_loop
from tests.helpers import assert_clean, open_page, point_app_at


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- the API's guarantees


@pytest.mark.parametrize(("name", "steps"), [("vit", 12), ("video", 5)])
def test_monitor_leaves_training_bit_for_bit_unchanged(name: str, steps: int) -> None:
    """Weights and buffers (BatchNorm statistics) after the same loop with and without the monitor
    (probes every 2 steps, gradient metrics every 3, the FLOP count, the timing calibration with
    optimizer updates at every frozen-prefix length) are equal bit for bit."""
    plain = own_loop.SETUPS[name]()
    own_loop.train(plain, steps)
    watched = own_loop.SETUPS[name]()
    x0, y0 = own_loop.batch_at(watched, 0)
    optimizer = own_loop.make_optimizer(watched)
    cost = CostSpec(
        lambda: F.cross_entropy(watched.model(x0), y0), stem=watched.stem, optimizer=optimizer, calibration=2
    )
    mon = LayerMonitor(
        watched.blocks,
        ProbeSpec(watched.probe, watched.model, every=2),
        log_every=3,
        total_steps=steps,
        model=watched.model,
        writer=NullWriter(),
        cost=cost,
    )
    assert not optimizer.state and all(p.grad is None and p.requires_grad for p in watched.model.parameters())
    own_loop.train(watched, steps, monitor=mon, optimizer=optimizer)
    mon.close()
    a, b = _state(plain.model), _state(watched.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    n = len(watched.blocks)
    assert {k: len(v) for k, v in mon.timer.calibration.items()} == dict.fromkeys(range(n), 2)
    assert mon.timer.wall.steps == {0: steps}
    frame = mon.layer_frame()
    assert set(frame["metric"]) == set(schema.BLOCK_METRICS)
    assert set(frame["block"]) == set(range(len(watched.blocks)))
    per_k = [mon.flop_model["per_step"][str(k)] for k in range(len(watched.blocks))]
    assert all(a > b for a, b in zip(per_k, per_k[1:]))  # each frozen block saves its backward


def test_background_probes_give_the_loop_probes_numbers_and_leave_training_unchanged() -> None:
    """``background=True``: each probe reads a copy of the weights taken when it starts, in
    another thread, while training goes on. Every probe metric equals the in-loop monitor's, and
    the weights equal those of the loop without a monitor, bit for bit."""
    steps = 9
    plain = own_loop.SETUPS["vit"]()
    own_loop.train(plain, steps)
    frames = []
    for background in (False, True):
        setup = own_loop.SETUPS["vit"]()
        forward = (lambda model, batch: model(batch)) if background else setup.model
        mon = LayerMonitor(
            setup.blocks,
            ProbeSpec(setup.probe, forward, every=2, background=background),
            log_every=3,
            total_steps=steps,
            model=setup.model,
            writer=NullWriter(),
        )
        own_loop.train(setup, steps, monitor=mon)
        mon.close()
        a, b = _state(plain.model), _state(setup.model)
        assert all(torch.equal(a[k], b[k]) for k in a)
        frames.append(mon.layer_frame().sort_values(["step", "block", "metric"]).reset_index(drop=True))
        if background:
            shadow = mon._shadow.owners[0]
            assert shadow is not setup.model and all(p.grad is None for p in shadow.parameters())
    probe_metrics = frames[0]["metric"].isin(["cka_prev", "cka_init", "cka_final", "eff_rank", "feat_std"])
    assert probe_metrics.sum() > 0
    inline, background = frames
    assert inline[probe_metrics].equals(background[probe_metrics])
    assert sorted(set(inline.loc[probe_metrics, "step"])) == [0, 2, 4, 6, 8, 9]
    with pytest.raises(LayerLockError, match="background=True needs model="):
        LayerMonitor(setup.blocks, ProbeSpec(setup.probe, forward, every=2, background=True), writer=NullWriter())


def test_clips_positions_dim_rule() -> None:
    assert clips_positions_dim(torch.zeros(4, 7)).shape == (4, 1, 7)
    assert clips_positions_dim(torch.zeros(4, 17, 32)).shape == (4, 17, 32)  # tokens, batch first
    conv = torch.arange(2 * 3 * 2 * 2 * 2.0).reshape(2, 3, 2, 2, 2)  # (B, C, T, H, W)
    x = clips_positions_dim(conv)
    assert x.shape == (2, 8, 3) and torch.equal(x[1, 5], conv[1, :, 1, 0, 1])  # channels are dim
    assert clips_positions_dim((torch.zeros(4, 5, 6), "attention")).shape == (4, 5, 6)
    with pytest.raises(LayerLockError, match="features="):
        clips_positions_dim({"x": 1})


def _tiny_chain():
    torch.manual_seed(0)
    stem = nn.Linear(3, 8)
    blocks = [nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)]
    head = nn.Linear(8, 2)
    model = nn.Sequential(stem, *blocks, head)
    return model, stem, blocks


def test_freeze_prefix_on_any_modules() -> None:
    model, stem, blocks = _tiny_chain()
    model[3][0].bias.requires_grad_(False)  # a parameter the user fixed: stays fixed after unfreezing
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(5, 3)
    model(x).sum().backward()
    opt.step()
    freeze_prefix(blocks, 2, opt, stem=[stem])
    frozen = [*stem.parameters(), *blocks[0].parameters(), *blocks[1].parameters()]
    assert all(not p.requires_grad and p.grad is None and p not in opt.state for p in frozen)
    assert frozen_prefix_length(blocks) == 2
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad)) for b in blocks]
    before = [p.detach().clone() for p in frozen]
    for _ in range(3):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    assert seen[:3] == [False, False, True]  # the frozen prefix builds no graph
    assert all(torch.equal(a, p) for a, p in zip(before, frozen))
    for h in hooks:
        h.remove()
    freeze_prefix(blocks, 0, opt, stem=[stem])
    assert frozen_prefix_length(blocks) == 0
    assert all(p.requires_grad for p in frozen) and not model[3][0].bias.requires_grad
    with pytest.raises(ScheduleError, match="at least one must train"):
        freeze_prefix(blocks, 3)


def test_a_trainable_stem_before_a_frozen_block_is_warned_about() -> None:
    model, stem, blocks = _tiny_chain()
    freeze_prefix(blocks, 1)  # stem not given: it would silently stop training
    with pytest.warns(UserWarning, match="stem="):
        model(torch.randn(2, 3)).sum().backward()
    assert all(p.grad is None for p in stem.parameters())


def test_apply_schedule_follows_the_json_and_checks_it() -> None:
    model, stem, blocks = _tiny_chain()
    schedule = {"n_blocks": 3, "stages": [{"step": 2, "frozen": 1}, {"step": 4, "frozen": 2}], "source": {}}
    assert [apply_schedule(schedule, blocks, s, stem=[stem]) for s in range(6)] == [0, 0, 1, 1, 2, 2]
    assert frozen_prefix_length(blocks) == 2 and not any(p.requires_grad for p in stem.parameters())
    with pytest.raises(ScheduleError, match="n_blocks=4 but 3 blocks"):
        apply_schedule({**schedule, "n_blocks": 4}, blocks, 0)
    with pytest.raises(ScheduleError, match="cannot unfreeze"):
        apply_schedule({**schedule, "stages": [{"step": 1, "frozen": 2}, {"step": 2, "frozen": 1}]}, blocks, 0)


def test_attaching_runs_the_full_garbage_collection_training_would_otherwise_pay() -> None:
    """The first full collection after MLflow's import walks every object it left: attaching
    runs it, so that it does not fall in a training step."""
    import gc

    model, stem, blocks = _tiny_chain()
    full = []

    def seen(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(info)

    gc.callbacks.append(seen)
    try:
        mon = LayerMonitor(blocks, ProbeSpec(torch.zeros(4, 3), model, every=2), model=model, writer=NullWriter())
    finally:
        gc.callbacks.remove(seen)
    assert full, "no full collection while attaching"
    mon.close(final_probe=False)


def test_monitor_step_times_leave_out_the_monitors_own_time(monkeypatch) -> None:
    """time_model.json's training record: each step's time less the time spent inside the
    monitor (here a probe that costs 1 s on a fake clock), filed under the frozen-prefix length
    it ran at; the monitor's time is the overhead per step."""
    import time

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(time, "process_time", lambda: clock[0] / 2)
    model, stem, blocks = _tiny_chain()

    def forward(batch):
        clock[0] += 1.0
        return model(batch)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = LayerMonitor(
        blocks, ProbeSpec(torch.zeros(4, 3), forward, every=2), log_every=100, model=model, writer=NullWriter()
    )
    for step in range(6):
        freeze_prefix(blocks, 0 if step < 3 else 2, optimizer, stem=[stem])
        clock[0] += 0.1 if step < 3 else 0.04  # the step itself: faster with 2 blocks frozen
        mon.after_backward(step)  # probes at steps 0, 2, 4
        mon.after_step(step)
    record = mon.timer.to_dict({})
    assert record["training"]["0"]["steps"] == 3 and record["training"]["2"]["steps"] == 3
    assert record["training"]["0"]["median_s"] == pytest.approx(0.1)
    assert record["training"]["2"]["median_s"] == pytest.approx(0.04)
    assert record["overhead_s_per_step"] == pytest.approx(3.0 / 6)
    assert record["cpu"]["training"]["2"]["median_s"] == pytest.approx(0.02)
    assert record["total_s"] == pytest.approx(3 * 0.1 + 3 * 0.04 + 3.0)
    mon.close(final_probe=False)


def test_flop_count_puts_everything_back() -> None:
    setup = own_loop.video_setup(n_train=8, n_probe=4)
    model, (x, y) = setup.model, own_loop.batch_at(setup, 0)
    before, rng = _state(model), torch.get_rng_state()
    fm = count_flop_model(setup.blocks, lambda: F.cross_entropy(model(x), y), model=model)
    assert torch.equal(rng, torch.get_rng_state())
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert fm["n_blocks"] == 5 and fm["per_step_k"] == "k = blocks 0..k-1 frozen"


def test_null_writer_logs_nothing_and_the_monitor_runs_with_it(tmp_path, monkeypatch) -> None:
    """A monitor on a NullWriter measures everything (per-block metrics, FLOP model, step times)
    and stores nothing: no tracking store, no run folder, no file written."""
    from core.tracking import RUNS_ENV, Writer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "runs"))
    writer = NullWriter()
    assert isinstance(writer, Writer) and not writer.stores

    def never(f) -> None:
        raise AssertionError("the NullWriter wrote a file")

    assert writer.log_file("x.bin", never) is None and writer.flush() is True
    model, stem, blocks = _tiny_chain()
    cost = CostSpec(lambda: model(torch.randn(4, 3)).square().mean(), stem=[stem], calibration=1)
    mon = LayerMonitor(
        blocks, ProbeSpec(torch.randn(8, 3), model, every=2), log_every=2, model=model, writer=writer, cost=cost
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        model(torch.randn(4, 3)).square().mean().backward()
        mon.after_backward(step)
        opt.step()
        opt.zero_grad()
        mon.after_step(step, 1.0)
    mon.close()
    assert mon.run_id is None
    assert set(mon.layer_frame()["metric"]) == set(schema.BLOCK_METRICS)
    assert mon.flop_model is not None and mon.timer.wall.steps == {0: 4}
    assert list(tmp_path.iterdir()) == []


def _probe_steps(mon: LayerMonitor, model: nn.Module, steps: range) -> None:
    """The trainer's calls on a plain loop whose data is a function of the step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in steps:
        torch.manual_seed(step)
        model(torch.randn(4, 3)).square().mean().backward()
        mon.after_backward(step)
        opt.step()
        opt.zero_grad()
        mon.after_step(step)


def test_monitor_state_dict_round_trip_continues_as_an_uninterrupted_run(tmp_path) -> None:
    """What the trainer's resume needs (its checkpoint keeps ``state_dict()``): a monitor that
    loads the state of one stopped at step 3 has its rows and probe history, and its next probes
    (``cka_prev`` and ``cka_init`` read the earlier probes' stored features) give the numbers of a
    monitor that never stopped."""
    from core.tracking import open_writer

    probe_batch = torch.randn(8, 3)

    def monitor(model, blocks, writer):
        return LayerMonitor(
            blocks, ProbeSpec(probe_batch, model, every=2), model=model, writer=writer, log_every=2, loop_metrics=False
        )

    model, _, blocks = _tiny_chain()
    whole = monitor(model, blocks, NullWriter())
    _probe_steps(whole, model, range(7))
    model, _, blocks = _tiny_chain()
    with open_writer(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db") as writer:
        first = monitor(model, blocks, writer)
        _probe_steps(first, model, range(4))
        state = first.state_dict()
        first.close(final_probe=False)
        resumed = monitor(model, blocks, writer)
        resumed.load_state_dict(state, writer.reader())
        assert resumed.layer_rows == first.layer_rows and resumed.probes.steps == [0, 2]
        _probe_steps(resumed, model, range(4, 7))
        resumed.close(final_probe=False)
    assert resumed.probes.steps == whole.probes.steps == [0, 2, 4, 6]
    key = ["step", "block", "metric"]
    a, b = (m.layer_frame().sort_values(key).reset_index(drop=True) for m in (whole, resumed))
    assert set(b.query("step == 6")["metric"]) >= {"cka_prev", "cka_init"}
    assert a[key].equals(b[key]) and a["value"].tolist() == pytest.approx(b["value"].tolist(), abs=1e-6)
    with pytest.raises(LayerLockError, match="needs the run's reader"):
        monitor(model, blocks, NullWriter()).load_state_dict(state)


def test_monitor_rejects_bad_arguments() -> None:
    model, stem, blocks = _tiny_chain()
    probe = ProbeSpec(torch.zeros(4, 3), model)
    with pytest.raises(LayerLockError, match="non-empty list"):
        LayerMonitor([], probe, writer=NullWriter())
    with pytest.raises(LayerLockError, match="every must be"):
        ProbeSpec(torch.zeros(4, 3), model, every=0)
    with pytest.raises(LayerLockError, match="calibration must be"):
        CostSpec(lambda: model(torch.zeros(1, 3)).sum(), calibration=-1)
    with pytest.raises(LayerLockError, match="cost= needs model="):
        LayerMonitor(blocks, probe, writer=NullWriter(), cost=CostSpec(lambda: model(torch.zeros(1, 3)).sum()))
    with pytest.raises(LayerLockError, match="writer must be"):
        LayerMonitor(blocks, probe, writer=3.5)
    with pytest.raises(LayerLockError, match="run must be"):
        open_writer(run=3.5)


# ----------------------------------------------------------------------------- two torchvision runs


def test_own_loop_runs_carry_the_trainers_schema(own_loop_store) -> None:
    from analysis import io

    for run_id in (own_loop_store.vit, own_loop_store.video):
        rec = io.get_run(run_id, own_loop_store.uri)
        assert rec.status == "FINISHED" and rec.method == schema.METHOD_OWN_LOOP
        assert rec.param_int("train.steps") == own_loop_store.steps[run_id]
        names = {a.path for a in io.client(own_loop_store.uri).list_artifacts(run_id)}
        assert {
            schema.FLOP_MODEL_ARTIFACT,
            schema.TIME_MODEL_ARTIFACT,
            schema.LAYER_METRICS_ARTIFACT,
            schema.PROBE_DIR,
        } <= names
        depth = rec.param_int("model.depth")
        assert {schema.block_key(m, b) for m in schema.BLOCK_METRICS for b in range(depth)} <= set(rec.metrics)
        assert {schema.LOSS, schema.FLOPS, schema.WALL_S, schema.FROZEN_BLOCKS} <= set(rec.metrics)


@pytest.mark.parametrize("which", ["vit", "video"])
def test_analysis_convergence_and_schedule_on_own_loop_runs(own_loop_store, which, tmp_path, capsys) -> None:
    from analysis.__main__ import main

    run_id = getattr(own_loop_store, which)
    assert main(["convergence", "--run", run_id, "--json", "--tracking-uri", own_loop_store.uri]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_converged"] >= 1 and report["last_step"] == own_loop_store.steps[run_id]
    out = tmp_path / "schedule.json"
    assert main(["schedule", "--run", run_id, "--out", str(out), "--tracking-uri", own_loop_store.uri]) == 0
    schedule = json.loads(out.read_text())
    assert schedule["stages"] and schedule["predicted_saving_basis"] == "counted"
    assert 0 < schedule["predicted_flop_saving"] < 1
    # The wall-time saving from the run's own calibrated step times, at every frozen-prefix length.
    assert schedule["predicted_time_basis"] == "time_model" and 0 < schedule["predicted_time_saving"] < 1
    assert "affine" not in schedule["prediction"]["time_model"]
    assert "ESTIMATE" not in capsys.readouterr().err


@pytest.mark.parametrize("which", ["vit", "video"])
def test_derived_schedule_in_the_plain_loop_keeps_frozen_weights(own_loop_store, which) -> None:
    """A run's derived schedule, applied with apply_schedule in the same loop: each stage's frozen
    parameters stay bitwise what they were when it froze, and drop out of the optimizer."""
    from analysis import io
    from analysis.schedule import derive_run_schedule, schedule_parts

    run_id = getattr(own_loop_store, which)
    schedule = FreezeSchedule.from_dict(derive_run_schedule(io.load_run(run_id, own_loop_store.uri, schedule_parts())))
    s = own_loop.SETUPS[which]()
    optimizer = own_loop.make_optimizer(s)
    at_freeze: dict[int, list[torch.Tensor]] = {}

    def snapshot(step: int) -> None:
        k = frozen_prefix_length(s.blocks)
        if k and k not in at_freeze:
            at_freeze[k] = [p.detach().clone() for blk in s.blocks[:k] for p in blk.parameters()]

    # The video loop stops 3 steps after its last stage: it is the slower one.
    steps = own_loop_store.steps[run_id] if which == "vit" else schedule.stages[-1][0] + 3
    own_loop.train(s, steps, schedule=schedule, optimizer=optimizer, on_step=snapshot)
    final = schedule.frozen_at(steps - 1)
    assert sorted(at_freeze) == sorted({k for _, k in schedule.stages})
    for k, saved in at_freeze.items():
        now = [p for blk in s.blocks[:k] for p in blk.parameters()]
        assert all(torch.equal(a, p) for a, p in zip(saved, now))
    stem = [p for m in s.stem for p in ([m] if isinstance(m, nn.Parameter) else m.parameters())]
    frozen = [p for blk in s.blocks[:final] for p in blk.parameters()] + stem
    assert all(not p.requires_grad and p not in optimizer.state for p in frozen)
    assert any(p in optimizer.state for p in s.blocks[final].parameters())


def test_schedule_of_a_run_without_flop_model_is_a_labelled_estimate(tmp_path, capsys, monkeypatch) -> None:
    from analysis.__main__ import main
    from analysis.testing import create_run_from_frames, synthetic_layer_metrics

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = create_run_from_frames(
        "x",
        uri=uri,
        artifact_root=(tmp_path / "a").as_uri(),
        layer_df=synthetic_layer_metrics([100, 200, None, None], total_steps=400),
        params={"model.depth": 4, "train.steps": 400},
    )
    assert main(["schedule", "--run", run_id, "--tracking-uri", uri]) == 0
    captured = capsys.readouterr()
    schedule = json.loads(captured.out)
    assert schedule["predicted_saving_basis"] == "estimate"
    assert "estimate" in schedule["prediction"]["flop_model"]
    assert captured.err.strip().splitlines()[-1].startswith("note: the predicted saving is an ESTIMATE")
    # uniform cost 3n per step, 2k saved: prefix 1 on steps 100-199, prefix 2 on 200-399
    assert schedule["predicted_flop_saving"] == pytest.approx((100 * 2 + 200 * 4) / (400 * 12))
    point_app_at(uri, tmp_path, monkeypatch)  # the Schedule page says so too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        at = open_page("schedule")
    assert_clean(at)
    labels = {m.label: m.value for m in at.metric}
    assert labels["Predicted FLOP saving (estimate)"] == f"{schedule['predicted_flop_saving']:.1%}"
    assert any("**estimate**" in i.value for i in at.info)


def test_convergence_and_schedule_pages_on_own_loop_runs(own_loop_store, tmp_path, monkeypatch) -> None:
    point_app_at(own_loop_store.uri, tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        at = open_page("convergence")
        for run_id in (own_loop_store.vit, own_loop_store.video):
            at.selectbox(key="conv_run").select(run_id).run()
            assert_clean(at)
            table = next(df.value for df in at.dataframe if "converged at step" in df.value.columns)
            assert table["converged at step"].notna().any()
        at = open_page("schedule", at)
        for run_id in (own_loop_store.vit, own_loop_store.video):
            at.selectbox(key="sched_run").select(run_id).run()
            assert_clean(at)
            saving = next(m for m in at.metric if m.label.startswith("Predicted FLOP saving"))
            assert saving.label == "Predicted FLOP saving" and saving.value.endswith("%")
            assert not [b for b in at.button if b.key == "sched_launch"]  # not a trainer run


# ----------------------------------------------------------------------------- the example file


@pytest.mark.system
def test_example_file_runs_and_rejects_bad_input(tmp_path, capsys) -> None:
    from tests.helpers import run_cli

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = run_cli(
        "-m",
        "experiments.examples.own_loop",
        "--model",
        "vit",
        "--steps",
        "30",
        "--every",
        "10",
        "--tracking-uri",
        uri,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run_id = done.stdout.strip().splitlines()[-1]
    from analysis import io

    assert io.get_run(run_id, uri).status == "FINISHED"
    bad = tmp_path / "four.json"
    bad.write_text(json.dumps({"n_blocks": 5, "stages": [{"step": 3, "frozen": 1}]}))
    for argv, message in (
        (["--steps", "0"], "--steps and --every must be at least 1"),
        (["--schedule", str(tmp_path / "none.json")], "schedule file not found"),
        (["--schedule", str(bad)], "the schedule is for 5 blocks, --model vit has 4"),
    ):
        assert own_loop.main([*argv, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_monitor_logs_into_the_active_mlflow_run_and_leaves_it_open(tmp_path) -> None:
    import mlflow

    from analysis import io

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model, stem, blocks = _tiny_chain()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as run:
            mon = LayerMonitor(blocks, ProbeSpec(torch.randn(8, 3), model, every=2), log_every=2, model=model)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(4):
                loss = model(torch.randn(4, 3)).square().mean()
                loss.backward()
                mon.after_backward(step)
                opt.step()
                opt.zero_grad()
                mon.after_step(step, loss)
            mon.close()
            assert mon.run_id == run.info.run_id
            assert io.get_run(run.info.run_id, uri).status == "RUNNING"  # the user's run: theirs to end
    finally:
        mlflow.set_tracking_uri(previous)
    rec = io.get_run(run.info.run_id, uri)
    assert rec.status == "FINISHED" and rec.method == schema.METHOD_OWN_LOOP
    assert rec.param_int("train.steps") == 4 and rec.param_int("model.depth") == 3
    frame = io.load_layer_metrics(run.info.run_id, uri)
    assert sorted(frame.query("metric == 'cka_final'")["step"].unique()) == [0, 2, 4]
    assert schema.FLOP_MODEL_ARTIFACT not in {a.path for a in io.client(uri).list_artifacts(run.info.run_id)}
