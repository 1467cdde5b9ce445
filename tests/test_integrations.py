"""LayerLock on models and frameworks nobody here wrote: the public latent loss, the Hugging Face
``Trainer`` callback (on ``transformers``' own ``VideoMAEForPreTraining``), the Lightning callback
(on a timm ViT), the ``layerlock`` command. Tiny sizes, random weights, nothing downloaded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analysis import io, schema
from core.errors import LayerLockError
from core.integrations import LayerLockSession, check_version, find_blocks
from core.objectives import latent_loss, prefix_output

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # what the HF Trainer needs to run on torch

hf = pytest.importorskip("experiments.examples.hf_videomae")


def _store(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def _frozen_params(blocks, k):
    return [p for b in blocks[:k] for p in b.parameters()]


# ----------------------------------------------------------------------------- the public objective


def test_latent_loss_is_the_trainers_on_any_model_and_stops_after_block_k_minus_1():
    from transformers import VideoMAEForPreTraining

    model = VideoMAEForPreTraining(hf.tiny_config()).eval()
    blocks = find_blocks(model)
    assert blocks == list(model.videomae.encoder.layer)
    pv = hf.batch_of(hf.MovingDigitsForHF("val", 2), 2)["pixel_values"]
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    out = prefix_output(blocks, 2, lambda: model.videomae(pv))
    for h in handles:
        h.remove()
    assert ran == [0, 1]  # blocks 2.. never ran
    with torch.no_grad():
        x = model.videomae.embeddings(pv, None)
        for b in blocks[:2]:
            x = b(x)
            x = x[0] if isinstance(x, tuple) else x
    assert torch.equal(out, x)
    n = x.shape[1]
    mask_idx = torch.arange(n // 2, n).expand(2, -1)
    pred = torch.randn(2, n - n // 2, x.shape[-1], requires_grad=True)
    loss = latent_loss(blocks, 2, lambda k: prefix_output(blocks, k, lambda: model.videomae(pv)), pred, mask_idx)
    target = torch.nn.functional.layer_norm(x, x.shape[-1:])[:, n // 2 :]
    assert torch.allclose(loss, torch.nn.functional.mse_loss(pred, target))
    loss.backward()
    assert pred.grad is not None and all(p.grad is None for p in model.parameters())  # target under no_grad
    assert latent_loss(blocks, 0, lambda k: None, pred, mask_idx) is None  # stage 0: pixel loss only


def test_bad_input_gives_one_clear_error():
    from transformers import VideoMAEForPreTraining

    from core.integrations.huggingface import SUPPORTED, LayerLockCallback

    model = VideoMAEForPreTraining(hf.tiny_config(depth=4))
    blocks = find_blocks(model)
    with pytest.raises(LayerLockError, match="blocks are not in the model"):
        LayerLockSession(model, blocks=[nn.Linear(2, 2)])
    with pytest.raises(LayerLockError, match="cannot find the blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(LayerLockError, match="n_blocks=8 but 4 blocks"):
        LayerLockSession(model, {"n_blocks": 8, "stages": [{"step": 5, "frozen": 6}]})
    with pytest.raises(LayerLockError, match="block 4, which does not exist"):
        latent_loss(blocks, 5, lambda k: None, torch.zeros(1, 1, 32))
    with pytest.raises(LayerLockError, match="transformers 4.10.0 is not supported"):
        check_version("transformers", "4.10.0", SUPPORTED)
    with pytest.raises(LayerLockError, match="needs a schedule"):
        LayerLockCallback(model, None, latent=True)


def test_layerlock_command_dispatches_to_both_command_lines(capsys):
    from experiments.console import main

    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    for command in (
        "pretrain",
        "demo",
        "study",
        "evaluate",
        "freeze-test",
        "bench",
        "sync",
        "convergence",
        "schedule",
        "compare",
        "agreement",
        "freeze-grid",
    ):
        assert f"  {command} " in listed
    for command in ("schedule", "pretrain"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: layerlock {command}")
    assert main(["nope"]) == 2


# ----------------------------------------------------------------------------- Hugging Face Trainer


@pytest.mark.system  # trains several framework runs in process (tens of seconds each)
def test_hf_mae_then_derived_schedule_then_layerlock(tmp_path):
    uri = _store(tmp_path)
    mae = hf.train(tmp_path / "mae", 30, tracking_uri=uri, every=10)
    run = mae["run_id"]
    artifacts = {a.path for a in io.client(uri).list_artifacts(run)}
    assert {schema.LAYER_METRICS_ARTIFACT, schema.FLOP_MODEL_ARTIFACT, schema.TIME_MODEL_ARTIFACT} <= artifacts
    assert io.load_flop_model(run, uri)["n_blocks"] == 4
    assert io.load_time_model(run, uri) is not None
    layer = io.load_layer_metrics(run, uri)
    assert set(layer["block"]) == {0, 1, 2, 3}
    assert {"cka_prev", "grad_norm", "update_ratio", "feat_std"} <= set(layer["metric"])
    record = io.get_run(run, uri)
    assert schema.block_key("grad_norm", 3) in record.metrics

    schedule = hf.derive(run, uri, 30)
    assert schedule["stages"], "no block converged in 30 steps: the schedule has nothing to apply"
    first_step, first_k = schedule["stages"][0]["step"], schedule["stages"][0]["frozen"]

    ll = hf.train(tmp_path / "ll", 30, schedule=schedule, latent=True, tracking_uri=uri, every=10)
    model, opt = ll["model"], ll["optimizer"]
    blocks = find_blocks(model)
    k = schedule["stages"][-1]["frozen"]
    frozen = _frozen_params(blocks, k) + list(model.videomae.embeddings.parameters())
    assert all(not p.requires_grad for p in frozen)
    assert not any(p in opt.state for p in frozen)  # no optimizer state for frozen parameters
    assert any(p in opt.state for p in blocks[k].parameters())
    hist = io.load_history(ll["run_id"], [schema.LOSS_LATENT, schema.FROZEN_BLOCKS], uri)
    latent_steps = sorted(hist[hist["metric"] == schema.LOSS_LATENT]["step"])
    assert latent_steps and latent_steps[0] >= first_step  # from the first stage on, not before
    assert latent_steps[0] - first_step <= 5  # log_every=5: at the first log step of it
    frozen_logged = hist[hist["metric"] == schema.FROZEN_BLOCKS]
    assert int(frozen_logged[frozen_logged["step"] >= first_step]["value"].iloc[0]) == first_k
    # The FLOP model counts the target's forward: the same as MAE's at stage 0, more from stage 1 on
    # (here, at mask ratio 0.75, more than freezing saves: docs/integrations.md, "What it costs").
    ll_flops, mae_flops = io.load_flop_model(ll["run_id"], uri)["per_step"], io.load_flop_model(run, uri)["per_step"]
    assert ll_flops["0"] == mae_flops["0"]
    assert all(ll_flops[str(k)] > mae_flops[str(k)] for k in range(1, 4))


@pytest.mark.system  # trains several framework runs in process (tens of seconds each)
def test_hf_resume_mid_stage_equals_a_run_that_never_stopped(tmp_path):
    uri = _store(tmp_path)
    schedule = {"n_blocks": 4, "stages": [{"step": 6, "frozen": 2}]}
    kw = dict(schedule=schedule, latent=True, tracking_uri=uri, every=5)
    whole = hf.train(tmp_path / "whole", 16, **kw)
    at_freeze = hf.train(tmp_path / "at_freeze", 16, stop_at=6, **kw)  # weights when the stage begins
    stopped = hf.train(tmp_path / "stopped", 16, stop_at=10, save_steps=10, **kw)
    checkpoint = str(tmp_path / "stopped" / "checkpoint-10")
    resumed = hf.train(tmp_path / "stopped", 16, save_steps=10, resume=checkpoint, **kw)

    assert resumed["run_id"] == stopped["run_id"]  # logs go on in the same MLflow run
    blocks = find_blocks(resumed["model"])
    assert resumed["callback"].session.stage == 2
    frozen = _frozen_params(blocks, 2)
    assert not any(p in resumed["optimizer"].state for p in frozen)
    for a, b in zip(whole["model"].state_dict().values(), resumed["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        _frozen_params(find_blocks(whole["model"]), 2), _frozen_params(find_blocks(at_freeze["model"]), 2), strict=True
    ):
        assert torch.equal(a, b)  # frozen from step 6 on: bitwise unchanged


# ----------------------------------------------------------------------------- Lightning + timm


def _lightning():
    pytest.importorskip("lightning")
    pytest.importorskip("timm")
    return pytest.importorskip("experiments.examples.lightning_timm")


@pytest.mark.system  # trains several framework runs in process (tens of seconds each)
def test_lightning_timm_schedule_latent_loss_into_the_mlflow_logger_run(tmp_path):
    lt = _lightning()
    uri = _store(tmp_path)
    schedule = {"n_blocks": 4, "stages": [{"step": 6, "frozen": 2}]}
    at_freeze = lt.train(tmp_path / "a", 6, schedule=schedule, latent=True, tracking_uri=uri, every=5)
    run = lt.train(tmp_path / "b", 16, schedule=schedule, latent=True, tracking_uri=uri, every=5)
    module, trainer = run["module"], run["trainer"]
    assert run["run_id"] == trainer.logger.run_id  # the monitor logs into MLFlowLogger's run
    blocks = list(module.vit.blocks)
    frozen = _frozen_params(blocks, 2)
    opt = trainer.optimizers[0]
    assert not any(p in opt.state for p in frozen) and any(p in opt.state for p in blocks[2].parameters())
    for a, b in zip(frozen, _frozen_params(list(at_freeze["module"].vit.blocks), 2), strict=True):
        assert torch.equal(a, b)  # bitwise unchanged from the stage's step on
    hist = io.load_history(run["run_id"], [schema.LOSS_LATENT], uri)
    assert sorted(hist["step"])[0] >= 6
    assert schema.block_key("cka_prev", 3) in io.get_run(run["run_id"], uri).metrics


def _lightning_resume(tmp_path, every):
    lt = _lightning()
    uri = _store(tmp_path)
    kw = dict(
        schedule={"n_blocks": 4, "stages": [{"step": 6, "frozen": 2}]}, latent=True, tracking_uri=uri, every=every
    )
    whole = lt.train(tmp_path / "whole", 15, **kw)
    # Lightning's own ModelCheckpoint at step 10 (5 batches an epoch: an epoch boundary, inside the
    # frozen stage), the run interrupted there, then resumed from that checkpoint in a new Trainer.
    lt.train(tmp_path / "stopped", 15, save_every=10, stop_at=10, **kw)
    ckpt = str(tmp_path / "stopped" / schema.CHECKPOINT_DIR / "step=10.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["callbacks"]["LayerLockCallback"]["frozen"] == 2
    resumed = lt.train(tmp_path / "stopped", 15, ckpt_path=ckpt, save_every=10, **kw)
    return whole, resumed, state


@pytest.mark.system  # trains several framework runs in process (tens of seconds each)
def test_lightning_resume_mid_stage_restores_the_frozen_prefix(tmp_path):
    whole, resumed, state = _lightning_resume(tmp_path, every=5)
    assert resumed["callback"].session.stage == 2
    assert resumed["run_id"] == state["callbacks"]["LayerLockCallback"]["run_id"]  # logs on into the same run
    frozen = _frozen_params(list(resumed["module"].vit.blocks), 2)
    assert all(not p.requires_grad for p in frozen)
    assert not any(p in resumed["trainer"].optimizers[0].state for p in frozen)
    for a, b in zip(_frozen_params(list(whole["module"].vit.blocks), 2), frozen, strict=True):
        assert torch.equal(a, b)
    _assert_same_run(whole, resumed)  # the trainable weights too, bit for bit


@pytest.mark.system  # trains several framework runs in process (tens of seconds each)
def test_lightning_resume_mid_stage_equals_a_run_that_never_stopped(tmp_path):
    """Bit for bit, with MLFlowLogger on and no probes: every weight, and the optimizer state
    (with probes: the test above)."""
    whole, resumed, _state = _lightning_resume(tmp_path, every=None)
    _assert_same_run(whole, resumed)


def _assert_same_run(whole, resumed):
    assert resumed["trainer"].global_step == whole["trainer"].global_step == 15
    for a, b in zip(whole["module"].state_dict().values(), resumed["module"].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ow, orr = whole["trainer"].optimizers[0], resumed["trainer"].optimizers[0]
    for pw, pr in zip(whole["module"].parameters(), resumed["module"].parameters(), strict=True):
        assert (pw in ow.state) == (pr in orr.state)
        for key in ow.state.get(pw, {}):
            assert torch.equal(ow.state[pw][key], orr.state[pr][key])


def test_lightning_version_outside_the_range_is_one_error(monkeypatch):
    _lightning()
    import lightning.pytorch as pl

    from core.integrations.lightning import callback_for

    monkeypatch.setattr(pl, "__version__", "1.9.5")
    with pytest.raises(LayerLockError, match="lightning 1.9.5 is not supported"):
        callback_for(pl)()


# ----------------------------------------------------------------------------- feat_std over seeds


@pytest.mark.system  # trains four tiny HF runs in process
def test_hf_feat_std_over_seeds_reports_each_method_with_an_interval(tmp_path, capsys):
    uri = _store(tmp_path)
    argv = ["--seeds", "0,1", "--methods", "mae,latent_naive", "--steps", "6", "--out", str(tmp_path / "runs")]
    assert hf.main([*argv, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "position-controlled feat_std" in out
    mae_line = next(line for line in out.splitlines() if line.strip().startswith("mae "))
    naive_line = next(line for line in out.splitlines() if line.strip().startswith("latent_naive "))
    assert "n=2" in mae_line and "[" in mae_line and "ratio to mae" in naive_line
    # The naive latent: nothing frozen, no pixel loss, the latent loss from the first log step on.
    runs = io.client(uri).search_runs(
        [io.client(uri).get_experiment_by_name(hf.EXPERIMENT).experiment_id],
        filter_string=f"tags.{schema.TAG_METHOD} = 'latent_naive'",
    )
    assert len(runs) == 2
    hist = io.load_history(runs[0].info.run_id, [schema.LOSS_LATENT, schema.FROZEN_BLOCKS], uri)
    assert min(hist[hist["metric"] == schema.LOSS_LATENT]["step"]) <= 5
    assert set(hist[hist["metric"] == schema.FROZEN_BLOCKS]["value"]) <= {0.0}


def test_hf_feat_std_bad_methods_and_seeds_exit_2(capsys):
    assert hf.main(["--seeds", "0,1", "--methods", "mae,nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --methods nope")
    assert hf.main(["--seeds", "0,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input, command line


def test_bad_schedule_stage_and_dotted_blocks_are_one_error_each():
    from transformers import VideoMAEForPreTraining

    model = VideoMAEForPreTraining(hf.tiny_config(depth=4))
    # A stage whose latent target (block frozen-1) does not exist / leaves nothing to train.
    with pytest.raises(LayerLockError, match="frozen=6 leaves no block trainable"):
        LayerLockSession(model, {"n_blocks": 4, "stages": [{"step": 5, "frozen": 6}]}, latent=True)
    with pytest.raises(LayerLockError, match="no list of blocks there"):
        LayerLockSession(model, blocks="encoder.blocks")


@pytest.mark.system  # starts a Lightning Trainer (about 10 s on a loaded machine)
@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"n_blocks": 8, "stages": [{"step": 5, "frozen": 6}]}, "n_blocks=8 but 4 blocks"),
        ({"n_blocks": 4, "stages": [{"step": 5, "frozen": 6}]}, "leaves no block trainable"),
    ],
    ids=["more-blocks-than-the-model", "stage-past-the-last-block"],
)
def test_lightning_example_bad_schedule_exits_2(tmp_path, capsys, schedule, message):
    import json

    lt = _lightning()
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(schedule))
    argv = ["--steps", "2", "--schedule", str(path), "--out", str(tmp_path / "run")]
    assert lt.main([*argv, "--tracking-uri", _store(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_hf_example_framework_version_outside_the_range_exits_2(tmp_path, capsys, monkeypatch):
    import core.integrations.huggingface as hf_integration  # the module object the callback reads

    monkeypatch.setattr(hf_integration.transformers, "__version__", "6.1.0")
    assert hf.main(["--steps", "2", "--out", str(tmp_path / "run"), "--tracking-uri", _store(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: transformers 6.1.0 is not supported: LayerLock's callback supports transformers >=4.40,<6"


# ----------------------------------------------------------------------------- bench integrations


def test_bench_integrations_bad_steps_exit_2(capsys):
    from experiments.cli import main

    assert main(["bench", "integrations", "--steps", "3"]) == 2
    assert "error: bench integrations: --steps must be at least 10" in capsys.readouterr().err


@pytest.mark.system  # trains ten tiny framework runs in process
def test_bench_integrations_runs_and_prints_every_field(capsys):
    _lightning()
    from experiments.cli import main

    assert main(["bench", "integrations", "--steps", "10", "--every", "5", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]  # the build and the machine
    assert first.startswith("torch ") and "cores" in first and "kernels) on " in first
    assert "HF VideoMAE, schedule " in out and "measured/predicted" in out
    stage_rows = [line.split() for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    assert stage_rows and stage_rows[0][0] == "0" and len(stage_rows) >= 2  # k=0 and a frozen stage
    for framework in ("hf", "lightning"):
        line = next(line for line in out.splitlines() if line.startswith(f"{framework} callback overhead"))
        assert "every=5" in line and "ratio " in line and "ms/step" in line
