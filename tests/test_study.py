"""tools/study.py and detection/study: the variants differ as named (checked on the modules,
parameter counts and behaviour, not on names), and a tiny study runs end to end and resumes."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones.resnet import ZeroPadShortcut, build_resnet
from detection.data.shapes import generate_shapes
from detection.study import StudyError, backbone_cost, final_loss, study_variants
from tests.helpers import load_tool, tiny_overrides


def _net(variant) -> nn.Module:
    return build_resnet(variant.depth, out_features=("res5",), norm="bn", freeze_at=0,
                        residual=variant.residual, shortcut=variant.shortcut)


def _blocks(net: nn.Module) -> list[nn.Module]:
    return [block for stage in (net.res2, net.res3, net.res4, net.res5) for block in stage]


def _projections(block: nn.Module) -> list[nn.Conv2d]:
    """1x1 convs outside the block's own branch (conv1/conv2): projection shortcuts."""
    branch = {id(block.conv1), id(block.conv2)}
    return [m for m in block.modules() if isinstance(m, nn.Conv2d) and id(m) not in branch]


def test_degradation_and_shortcut_variants():
    names = [v.name for v in study_variants("degradation", [34, 18])]
    assert names == ["plain-18", "plain-34", "residual-18", "residual-34"]
    shortcuts = study_variants("shortcuts", [18, 34])
    assert [(v.depth, v.residual, v.shortcut) for v in shortcuts] == [(34, True, "A"), (34, True, "B"), (34, True, "C")]
    # degradation's residual-34 (option A) is the shortcut study's A-34: one run folder for both
    assert study_variants("degradation", [34])[1].folder == shortcuts[0].folder == "residual-34-A"
    assert len({v.folder for v in study_variants("degradation", [18, 34]) + shortcuts}) == 6
    with pytest.raises(StudyError, match="--study"):
        study_variants("deeper", [18])


def _zero_branch_outputs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's output when its residual branch F(x) is zero (last norm's scale and shift 0)."""
    with torch.no_grad():
        block.norm2.weight.zero_()
        block.norm2.bias.zero_()
        return block.eval()(x.clone())


def test_plain_net_adds_no_shortcut_and_residual_net_does():
    plain, residual = study_variants("degradation", [18])
    x = torch.rand(2, 64, 16, 16)  # non-negative, like the output of the ReLU before a block
    plain_block, residual_block = _net(plain).res2[0], _net(residual).res2[0]
    assert torch.equal(_zero_branch_outputs(plain_block, x), torch.zeros_like(x))  # relu(F(x)) only
    assert torch.equal(_zero_branch_outputs(residual_block, x), x)  # relu(0 + x) = x
    # and throughout the net: no block of the plain net has a shortcut module, and a forward hook
    # sees each plain block's output equal relu(branch) exactly
    plain_net = _net(plain).eval()
    assert all(block.shortcut is None and not block.residual for block in _blocks(plain_net))
    seen = []

    def hook(block, inputs, output):
        branch = block.norm2(block.conv2(torch.relu(block.norm1(block.conv1(inputs[0])))))
        seen.append(torch.allclose(output, torch.relu(branch)))

    for block in _blocks(plain_net):
        block.register_forward_hook(hook)
    with torch.no_grad():
        plain_net(torch.rand(1, 3, 64, 64))
    assert seen and all(seen)


def test_option_a_has_no_projection_and_c_one_in_every_block():
    a, b, c = study_variants("shortcuts", [34])
    plain = study_variants("degradation", [34])[0]
    nets = {v.shortcut: _net(v) for v in (a, b, c)}
    # A: zero-padding where the shape changes, no projection anywhere, plain's parameter count
    assert not any(_projections(block) for block in _blocks(nets["A"]))
    assert sum(isinstance(block.shortcut, ZeroPadShortcut) for block in _blocks(nets["A"])) == 3
    params = {k: sum(p.numel() for p in net.parameters()) for k, net in nets.items()}
    assert params["A"] == sum(p.numel() for p in _net(plain).parameters())
    # B: a projection exactly in the three blocks that change shape; C: in all 16 blocks
    assert sum(bool(_projections(block)) for block in _blocks(nets["B"])) == 3
    assert all(len(_projections(block)) == 1 for block in _blocks(nets["C"]))
    projection_params = {k: sum(p.numel() for block in _blocks(net) for p in (block.shortcut.parameters()
                         if block.shortcut is not None else [])) for k, net in nets.items()}
    assert projection_params["A"] == 0 < projection_params["B"] < projection_params["C"]
    assert params["C"] - params["A"] == projection_params["C"]
    # behaviour: C's shortcut in an identity-shaped block is not the identity
    block = _blocks(nets["C"])[1]
    x = torch.rand(1, 64, 8, 8)
    assert not torch.allclose(block.shortcut.eval()(x), x)


def test_backbone_cost_matches_the_paper_and_orders_the_options():
    # the paper's Table 1: ResNet-18 1.8 and ResNet-34 3.6 x 10^9 multiply-adds at 224x224
    r18, r34 = (backbone_cost(v) for v in study_variants("degradation", [18, 34])[2:])
    assert r18["macs"] / 1e9 == pytest.approx(1.8, abs=0.05)
    assert r34["macs"] / 1e9 == pytest.approx(3.6, abs=0.1)
    costs = [backbone_cost(v) for v in study_variants("shortcuts", [34])]
    assert costs[0]["params"] < costs[1]["params"] < costs[2]["params"]
    assert costs[0]["macs"] < costs[1]["macs"] < costs[2]["macs"]
    assert costs[0]["params"] == r34["params"]  # option A adds nothing to the plain/residual net


def test_final_loss_is_the_mean_of_the_tail():
    curve = [[i, float(v)] for i, v in enumerate([9, 9, 9, 9, 9, 9, 9, 9, 2, 4])]
    assert final_loss(curve, 0.2) == 3.0
    assert final_loss(curve[:1]) == 9.0


@pytest.mark.slow
def test_tiny_study_runs_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    generate_shapes(data / "shapes", num_train=6, num_val=3, num_test=2, seed=0, image_size=(64, 80))
    overrides = [o for o in tiny_overrides(data, tmp_path / "unused", **{"solver.max_iter": 4,
                                                                        "datasets.test": ["shapes_val", "shapes_test"]})
                 if not o.startswith(("output_dir=", "model.backbone.norm="))] + ['model.backbone.norm="bn"']
    out = tmp_path / "study"
    tool = load_tool("study")
    args = ["--config", "configs/base.yaml", "--study", "degradation", "--depths", "18", "--output-dir", str(out),
            *overrides]
    assert tool.main(args) == 0

    def refuse(constant):  # strict JSON, as jq and JSON.parse read it (a trial: "APl": NaN)
        raise AssertionError(f"study.json holds {constant}")

    study = json.loads((out / "study.json").read_text(), parse_constant=refuse)
    assert any(value is None for v in study["variants"] for value in v["metrics"].values())  # undefined: null
    assert [v["name"] for v in study["variants"]] == ["plain-18", "residual-18"]
    for v in study["variants"]:
        assert [point[0] for point in v["loss_curve"]] == [1, 2, 3, 4]
        assert [point[0] for point in v["rpn_loss_curve"]] == [1, 2, 3, 4]
        assert v["final_train_loss"] > 0 and v["params"] > 0 and v["macs"] > 0
        # two test sets: the table's AP is the first set's (its keys are prefixed), not "-"
        assert (v["AP"], v["AP50"], v["AP_test_set"]) == (v["metrics"]["shapes_val/AP"],
                                                          v["metrics"]["shapes_val/AP50"], "shapes_val")
        assert (out / v["folder"] / "model_final.pth").is_file()
        assert set(v["final_losses"]) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    assert (out / "study.png").stat().st_size > 1000 and "| plain-18 |" in (out / "study.md").read_text()
    assert "Schedule: 4 iterations, lr 0.01 after a 2-iteration warmup from x0.001, no steps." \
        in (out / "study.md").read_text()
    assert "AP, AP50: COCO metrics on shapes_val (the first test set" in (out / "study.md").read_text()
    # the two runs really trained different nets from the same start: different losses
    assert study["variants"][0]["loss_curve"] != study["variants"][1]["loss_curve"]

    # resume: a finished variant is not trained again; an unfinished one continues its run
    (out / "residual-18-A" / "result.json").unlink()
    (out / "residual-18-A" / "model_final.pth").unlink()
    trained = []
    import detection.engine.trainer as trainer

    real_train = trainer.train
    monkeypatch.setattr(trainer, "train",
                        lambda cfg, **kw: trained.append((cfg.output_dir, kw)) or real_train(cfg, **kw))
    assert tool.main(args) == 0
    resumed = {"resume": True, "overwrite": False, "explicit": []}  # a resume may change nothing
    assert trained == [(str(out / "residual-18-A"), resumed)]
    again = json.loads((out / "study.json").read_text())
    assert again["variants"][0]["loss_curve"] == study["variants"][0]["loss_curve"]
    assert again["variants"][1]["loss_curve"] == study["variants"][1]["loss_curve"]  # exact resume
    assert " * |" in (out / "study.md").read_text()  # the resumed variant's train time is marked
    assert "* resumed after a stop: the train time is the last part's only." in (out / "study.md").read_text()
    # an unfinished variant is resumed only under the same config (here another lr): refused, not mixed
    from detection.study.run import run_variant

    residual = study_variants("degradation", [18])[1]
    (out / "residual-18-A" / "result.json").unlink()
    with pytest.raises(StudyError, match=r"residual-18-A was trained with another config than this study's \(1 key "
                                         r"differs: solver.base_lr"):
        run_variant(residual, "configs/base.yaml", [*overrides, "solver.base_lr=0.002"], out)
    # one stopped before its first checkpoint (metrics.jsonl, no last.pth) trains again from the start
    for name in ("model_final.pth", "last.pth"):
        (out / "residual-18-A" / name).unlink()
    trained.clear()
    assert tool.main(args) == 0
    assert trained == [(str(out / "residual-18-A"), {"resume": False, "overwrite": True, "explicit": []})]
    # the same overrides on another config: its finished runs are not reported as this config's
    other = tmp_path / "other.yaml"
    other.write_text(f"_base_: {Path('configs/base.yaml').resolve()}\nmodel: {{rpn: {{nms_thresh: 0.6}}}}\n")
    with pytest.raises(SystemExit) as stop:
        tool.main(["--config", str(other), *args[2:]])
    assert stop.value.code == 2
    assert "was trained with another config than this study's (1 key differs: model.rpn.nms_thresh (the run: 0.7, " \
        "now: 0.6))" in capsys.readouterr().err


@pytest.mark.slow  # tools/study.py end to end (no training)
def test_no_train_writes_the_cost_table_only(tmp_path):
    out = tmp_path / "cost"
    assert load_tool("study").main(["--config", "configs/study/shapes.yaml", "--study", "shortcuts", "--depths", "18",
                                    "--no-train", "--output-dir", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert [v["name"] for v in study["variants"]] == ["A-18", "B-18", "C-18"] and not study["trained"]
    assert "| B-18 | 18 |" in (out / "study.md").read_text() and not (out / "study.png").exists()
    assert not [p for p in out.iterdir() if p.is_dir()]  # nothing trained


def test_a_finished_run_with_other_settings_is_refused_not_reused(tmp_path):
    from detection.study.run import run_variant

    variant = study_variants("degradation", [18])[0]
    (tmp_path / variant.folder).mkdir()
    (tmp_path / variant.folder / "result.json").write_text(json.dumps({"settings": ["solver.max_iter=5"]}))
    with pytest.raises(StudyError, match="other settings"):
        run_variant(variant, "configs/study/shapes.yaml", ["solver.max_iter=6"], tmp_path)
    # the same settings, but the config now starts from other weights: not this study's run either
    from detection.config import load_config, save_config

    run_dir = tmp_path / variant.folder
    settings = ["solver.max_iter=5", *variant.overrides()]
    (run_dir / "result.json").write_text(json.dumps({"settings": settings}))
    save_config(load_config("configs/study/shapes.yaml", [*settings, f"output_dir={run_dir}"]), run_dir / "config.yaml")
    edited = tmp_path / "edited.yaml"
    edited.write_text(f"_base_: {Path('configs/study/shapes.yaml').resolve()}\nmodel: {{weights: trained.pth}}\n")
    with pytest.raises(StudyError, match=r"another config than this study's \(1 key differs: model.weights"):
        run_variant(variant, str(edited), ["solver.max_iter=5"], tmp_path)


@pytest.mark.parametrize("max_iter, steps, warmup", [(40, [32, 38], 4), (100, [80, 95], 10), (3000, [2400, 2850], 300)])
def test_max_iter_scales_the_warmup_with_the_lr_steps(max_iter, steps, warmup):
    """configs/study/shapes.yaml: 1000 iterations, warmup 100, steps [800, 950]. A shortened
    study warms up over the same fraction and then trains at base_lr until the first step."""
    from detection.config import load_config
    from detection.engine.optim import lr_factor
    from detection.study.run import schedule_overrides

    overrides = schedule_overrides("configs/study/shapes.yaml", [], max_iter)
    assert overrides == [f"solver.max_iter={max_iter}", f"solver.steps={json.dumps(steps)}",
                         f"solver.warmup_iters={warmup}"]
    solver = load_config("configs/study/shapes.yaml", overrides).solver
    factors = [lr_factor(it, warmup_iters=solver.warmup_iters, warmup_factor=solver.warmup_factor,
                         steps=solver.steps, gamma=solver.gamma) for it in range(max_iter)]
    assert factors[steps[0] - 1] == 1.0 and factors[warmup] == 1.0  # base_lr reached, before the drop
    assert factors.count(1.0) == steps[0] - warmup
    assert factors[-1] == pytest.approx(0.01)


def test_a_very_short_study_lists_only_the_lr_steps_it_reaches():
    """8 iterations: 800 and 950 of 1000 scale to 6 and 8, and a drop at the last iteration never
    happens (training would warn that 8 is not below max_iter 8); 2 iterations: none is left
    (steps [2, 2] was a config error blaming the file)."""
    from detection.study.run import schedule_overrides

    assert schedule_overrides("configs/study/shapes.yaml", [], 8)[1] == "solver.steps=[6]"
    assert schedule_overrides("configs/study/shapes.yaml", [], 2)[1] == "solver.steps=[]"


def test_max_iter_never_warms_up_past_the_first_step():
    from detection.study.run import schedule_overrides

    # a warmup as long as the first step's share of the schedule (not the study config's)
    assert schedule_overrides("configs/study/shapes.yaml", ["solver.warmup_iters=900"], 50)[1:] == \
        ["solver.steps=[40, 48]", "solver.warmup_iters=40"]


@pytest.mark.slow  # tools/study.py end to end (no training)
def test_no_train_study_records_the_scaled_schedule_it_used(tmp_path):
    out = tmp_path / "cost"
    assert load_tool("study").main(["--config", "configs/study/shapes.yaml", "--study", "shortcuts", "--depths", "18",
                                    "--no-train", "--max-iter", "40", "--output-dir", str(out)]) == 0
    schedule = json.loads((out / "study.json").read_text())["schedule"]
    assert {k: schedule[k] for k in ("max_iter", "steps", "warmup_iters", "base_lr")} == \
        {"max_iter": 40, "steps": [32, 38], "warmup_iters": 4, "base_lr": 0.01}
    assert {k: schedule["scaled_from"][k] for k in ("max_iter", "steps", "warmup_iters")} == \
        {"max_iter": 1000, "steps": [800, 950], "warmup_iters": 100}


def test_the_schedule_note_says_no_warmup_when_max_iter_scaled_it_to_none():
    """--max-iter 4 scales a 100-iteration warmup to 0: the note said 'a 0-iteration warmup from x0.01'."""
    from detection.study.report import schedule_note
    config = {"max_iter": 1000, "base_lr": 0.02, "warmup_iters": 100, "warmup_factor": 0.01,
              "lr_schedule": "multistep", "gamma": 0.1, "steps": [800, 950]}
    scaled = dict(config, max_iter=4, warmup_iters=0, steps=[3], scaled_from=config)
    assert schedule_note(scaled) == ("Schedule: 4 iterations, lr 0.02 from the start (no warmup), x0.1 at [3] "
                                     "(--max-iter scaled the config's 1000 iterations, lr 0.02 after a 100-iteration "
                                     "warmup from x0.01, x0.1 at [800, 950]).")
