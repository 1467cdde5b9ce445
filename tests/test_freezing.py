"""Freezing: schedules, the prefix freeze, no graph for frozen blocks, latent targets, FLOPs."""

from __future__ import annotations

import json

import pytest
import torch

from core.config import ExperimentConfig, LinearSchedule, load_config
from core.errors import ConfigError, LayerLockError, ScheduleError
from core.flops import count_step_flops, flop_model
from core.freezing import FreezeSchedule, schedule_from_config, set_frozen_prefix
from core.masking import tube_mask
from core.model import build_model
from core.objectives import compute_losses, freezes, latent_target, prefix_output
from core.train import build_optimizer
from tests.helpers import ROOT, tiny_dict


def _setup(objective="pixel"):
    cfg = ExperimentConfig.model_validate(tiny_dict(objective={"name": objective}))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.geometry)
    opt = build_optimizer(model, cfg)
    g = cfg.geometry
    video = torch.rand(4, 3, g.frames, g.size, g.size)
    keep, mask = tube_mask(4, g.grid, cfg.model.mask_ratio, torch.Generator().manual_seed(1))
    return cfg, model, opt, video, keep, mask


def _step(cfg, model, opt, video, keep, mask):
    losses = compute_losses(model, model, video, keep, mask, cfg.objective)
    losses["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return losses


def test_frozen_params_bitwise_unchanged_and_state_freed():
    cfg, model, opt, video, keep, mask = _setup()
    _step(cfg, model, opt, video, keep, mask)  # Adam state exists for every block now
    set_frozen_prefix(model, opt, 2)
    frozen = [p for b in model.blocks[:2] for p in b.parameters()] + list(model.patch_embed.parameters())
    assert all(p not in opt.state for p in frozen)
    before = [p.detach().clone() for p in frozen]
    train_before = [p.detach().clone() for p in model.blocks[2].parameters()]
    for _ in range(3):
        _step(cfg, model, opt, video, keep, mask)
    assert all(torch.equal(a, p) for a, p in zip(before, frozen))
    assert any(not torch.equal(a, p) for a, p in zip(train_before, model.blocks[2].parameters()))
    assert all(p not in opt.state for p in frozen)


def test_no_gradient_or_graph_reaches_frozen_prefix():
    cfg, model, opt, video, keep, mask = _setup()
    set_frozen_prefix(model, opt, 3)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad)) for b in model.blocks]
    losses = compute_losses(model, model, video, keep, mask, cfg.objective)
    for h in hooks:
        h.remove()
    assert seen == [False, False, False, True]  # frozen outputs carry no autograd graph
    losses["loss"].backward()
    for b in model.blocks[:3]:
        assert all(p.grad is None for p in b.parameters())
    assert all(p.grad is None for p in model.patch_embed.parameters())
    assert all(p.grad is not None for p in model.blocks[3].parameters())


def test_latent_target_is_frozen_block_output_on_unmasked_clip():
    cfg, model, opt, video, keep, mask = _setup("layerlock")
    set_frozen_prefix(model, opt, 2)
    x = model.embed(video)
    with torch.no_grad():
        for blk in model.blocks[:2]:
            x = blk(x)
    expected = torch.nn.functional.layer_norm(x, x.shape[-1:])
    run_prefix = lambda k: model.forward_encoder(video, None, upto=k)
    assert torch.allclose(latent_target(model.blocks, 2, run_prefix), expected, atol=1e-6)
    # The same target from any model's own forward, stopped after block 1 by a hook
    got = latent_target(model.blocks, 2, lambda k: prefix_output(model.blocks, k, lambda: model.forward_encoder(video)))
    assert torch.equal(got, latent_target(model.blocks, 2, run_prefix))
    losses = compute_losses(model, model, video, keep, mask, cfg.objective)
    assert "loss_latent" in losses
    set_frozen_prefix(model, opt, 0)
    assert "loss_latent" not in compute_losses(model, model, video, keep, mask, cfg.objective)


def test_schedule_validation_errors(tmp_path):
    with pytest.raises(ScheduleError, match="strictly increase"):
        FreezeSchedule(n_blocks=4, stages=((10, 1), (10, 2)))
    with pytest.raises(ScheduleError, match="cannot unfreeze"):
        FreezeSchedule(n_blocks=4, stages=((10, 2), (20, 1)))
    with pytest.raises(ScheduleError, match="no block trainable"):
        FreezeSchedule(n_blocks=4, stages=((10, 4),))
    with pytest.raises(ScheduleError, match="negative"):
        FreezeSchedule(n_blocks=4, stages=((-1, 1),))
    sched = FreezeSchedule(n_blocks=4, stages=((10, 1), (20, 3)))
    with pytest.raises(ScheduleError, match="after the end of training"):
        sched.check_within(15)
    assert [sched.frozen_at(s) for s in (0, 9, 10, 19, 20, 99)] == [0, 0, 1, 1, 3, 3]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(sched.to_dict()))
    assert FreezeSchedule.load(p).stages == sched.stages
    p.write_text('{"n_blocks": 4, "stages": [{"step": "x", "frozen": 1}]}')
    with pytest.raises(ScheduleError, match="must be an integer"):
        FreezeSchedule.load(p)
    p.write_text("{not json")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        FreezeSchedule.load(p)
    with pytest.raises(ScheduleError, match="not found"):
        FreezeSchedule.load(tmp_path / "missing.json")


def test_schedule_sources_from_config(tmp_path):
    lin = FreezeSchedule.linear(8, 300, LinearSchedule(start=0.25, end=0.75, final_frozen=0.75))
    assert lin.stages[0] == (75, 1) and lin.stages[-1] == (225, 6)
    cfg = load_config(None, ["freeze.schedule=[{step: 5, frozen: 1}, {step: 9, frozen: 2}]", "model.depth=4"])
    s = schedule_from_config(cfg.freeze, 4, 12)
    assert s.stages == ((5, 1), (9, 2))
    f = tmp_path / "four.json"
    f.write_text(json.dumps(s.to_dict()))
    from_file = load_config(None, [f"freeze.schedule={f}"])
    assert schedule_from_config(from_file.freeze, 4, 12).stages == s.stages
    with pytest.raises(ScheduleError, match="model.depth"):
        schedule_from_config(from_file.freeze, 6, 12)
    with pytest.raises(ConfigError):
        load_config(None, ["freeze.schedule={kind: linear, strat: 0.1}"])


def test_flops_fall_with_frozen_prefix_and_include_latent_forward():
    cfg = ExperimentConfig.model_validate(tiny_dict())
    f = [count_step_flops(cfg, 4, k) for k in range(cfg.model.depth)]
    assert all(a > b for a, b in zip(f, f[1:]))
    ll = ExperimentConfig.model_validate(tiny_dict(objective={"name": "layerlock"}))
    # with k frozen, layerlock pays an extra k-block forward over all tokens for its target
    assert count_step_flops(ll, 4, 2) > count_step_flops(cfg, 4, 2)
    assert count_step_flops(ll, 4, 0) == pytest.approx(f[0], rel=0.05)


def test_latent_scheduled_flops_add_target_forward_without_backward_saving():
    """latent_scheduled at stage k = the full unfrozen step + layerlock's k-block target forward."""
    pix = ExperimentConfig.model_validate(tiny_dict())
    ll = ExperimentConfig.model_validate(tiny_dict(objective={"name": "layerlock"}))
    ls = ExperimentConfig.model_validate(tiny_dict(objective={"name": "latent_scheduled"}))
    full = count_step_flops(pix, 4, 0)
    assert count_step_flops(ls, 4, 0) == full
    for k in (1, 2, 3):
        # layerlock(k) = pixel(k frozen) + target + latent head; latent_scheduled(k) = pixel(0) + the same
        assert count_step_flops(ls, 4, k) - count_step_flops(ll, 4, k) == full - count_step_flops(pix, 4, k)
        assert count_step_flops(ls, 4, k) > count_step_flops(ls, 4, k - 1) > 0
    assert "nothing frozen" in flop_model(ls, 4)["per_step_k"]


def test_latent_scheduled_freezes_nothing_and_targets_the_current_block_output(monkeypatch):
    import core.objectives as objectives

    cfg, model, opt, video, keep, mask = _setup("latent_scheduled")
    assert not freezes(cfg.objective) and freezes(ExperimentConfig.model_validate(tiny_dict()).objective)
    seen = []
    real = objectives.latent_target

    def spy(blocks, k, run_prefix):
        out = real(blocks, k, run_prefix)
        seen.append((k, out.detach().clone()))
        return out

    monkeypatch.setattr(objectives, "latent_target", spy)
    assert "loss_latent" not in compute_losses(model, model, video, keep, mask, cfg.objective, stage=0)
    with pytest.raises(LayerLockError, match="stage"):
        compute_losses(model, model, video, keep, mask, cfg.objective)
    targets = []
    for _ in range(2):
        losses = compute_losses(model, model, video, keep, mask, cfg.objective, stage=2)
        assert "loss_latent" in losses
        losses["loss"].backward()
        assert model.frozen_prefix == 0
        assert all(p.grad is not None for p in model.parameters())  # nothing frozen
        k, target = seen[-1]
        assert k == 2
        with torch.no_grad():  # block 1's layer-normalised output of the *current* model, unmasked clip
            x = model.embed(video)
            for blk in model.blocks[:2]:
                x = blk(x)
        assert torch.allclose(target, torch.nn.functional.layer_norm(x, x.shape[-1:]), atol=1e-6)
        targets.append(target)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert not torch.allclose(targets[0], targets[1])  # the target drifts with the student


def test_latent_scheduled_reads_the_layerlock_schedule_keys():
    cfg = load_config(ROOT / "experiments/configs/layerlock_tiny.yaml", ["objective.name=latent_scheduled"])
    own = load_config(ROOT / "experiments/configs/latent_scheduled_tiny.yaml")
    assert cfg.objective.name == own.objective.name == "latent_scheduled"
    assert cfg.freeze == own.freeze and schedule_from_config(own.freeze, 8, 300).stages[-1] == (225, 6)
