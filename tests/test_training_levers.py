"""The fast path's training plan per device (detection/accel/plan.py training_plan) and the GPU
levers in training (config group `accel`): with the levers off the same steps on every device (a
`meta` model stands in for CUDA); the sync-free proposals give the same losses and gradients; a
compiled trunk (CUDA's lever, applied here through CUDA's plan) gives the same losses, gradients
and state_dict keys. Their speed is measured on a GPU (tools/benchmark.py --device cuda --levers)."""
import copy
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from detection.accel import Levers, apply_training_plan, optimize_for_training, training_plan
from detection.accel.fold import FastConv2d
from detection.accel.levers import CompiledModule
from detection.accel.plan import ToChannelsLast
from tests.helpers import IMAGES, TARGETS, make_model
from tests.helpers import tiny_c4

ALL_LEVERS = Levers(cuda_channels_last=True, sync_free_postprocess=True, compile="default", cuda_graphs=True)


def losses_and_grads(model: nn.Module) -> tuple[dict, dict]:
    torch.manual_seed(3)  # the same RPN / RoI samples for every model
    losses = model([image.float() for image in IMAGES], TARGETS)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def assert_same_step(expected: tuple[dict, dict], got: tuple[dict, dict], rtol: float, atol: float) -> None:
    (expected_losses, expected_grads), (losses, grads) = expected, got
    assert losses.keys() == expected_losses.keys()
    for key, value in expected_losses.items():
        torch.testing.assert_close(losses[key], value, rtol=rtol, atol=atol, msg=key)
    assert grads.keys() == expected_grads.keys() and len(grads) > 10
    for name, value in expected_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=rtol, atol=atol, msg=name)


def test_the_training_plan_is_the_same_on_every_device_with_the_levers_off():
    """What the trainer asks for (channels_last=True): the CPU and CUDA plans differ only in the CPU
    kernels (the taps matmul and Winograd ran on the CPU only before the plan, too)."""
    cpu, cuda = training_plan("cpu", channels_last=True), training_plan("cuda", channels_last=True)
    assert cpu.fold_bn and cpu.channels_last and cpu.runner and cpu.small_map_taps and cpu.winograd
    assert cuda == replace(cpu, small_map_taps=False, winograd=False)
    assert cpu.compile is None and not cpu.sync_free_proposals
    assert not training_plan("cpu").channels_last  # optimize_for_training's own default, as before


def test_the_training_levers_per_device():
    """sync_free_postprocess on every device; compile off the CPU only; the inference-only levers
    (cuda_channels_last, cuda_graphs) change nothing in training."""
    cpu, cuda = training_plan("cpu", levers=ALL_LEVERS), training_plan("cuda", levers=ALL_LEVERS)
    assert cpu == replace(training_plan("cpu"), sync_free_proposals=True)
    assert cuda == replace(training_plan("cuda"), sync_free_proposals=True, compile="default")


def _conv_kinds(model: nn.Module) -> dict[str, tuple]:
    return {name: (type(m).__name__, getattr(m, "small_maps", None), getattr(m, "winograd", None))
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_a_model_off_the_cpu_follows_its_devices_plan():
    """A meta model (standing in for CUDA): folded BN, NHWC trunk, Res5Runner with hoisted convs,
    no CPU kernels installed, the same parameter names as on the CPU; with the levers the trunk
    is compiled in place and the RPN's proposals are sync-free."""
    on_cpu = optimize_for_training(tiny_c4().train(), channels_last=True)
    meta = optimize_for_training(tiny_c4().to("meta").train(), channels_last=True)
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in on_cpu.named_parameters()]
    assert meta.state_dict().keys() == on_cpu.state_dict().keys()
    assert isinstance(meta.trunk[0], ToChannelsLast) and meta.roi_heads.res5_runner.hoist
    kinds, cpu_kinds = _conv_kinds(meta), _conv_kinds(on_cpu)
    assert kinds.keys() == cpu_kinds.keys()
    assert any(kind == ("ScaledConv2d", False, False) for kind in kinds.values())
    assert not any(m.small_maps or m.winograd for m in meta.modules() if isinstance(m, FastConv2d))
    assert any(isinstance(m, FastConv2d) and m.small_maps for m in on_cpu.roi_heads.res5.modules())
    assert meta._compiled_call_impl is None and meta.trunk._compiled_call_impl is None
    levered = optimize_for_training(tiny_c4().to("meta").train(), channels_last=True, levers=ALL_LEVERS)
    assert levered.trunk._compiled_call_impl is not None and levered.rpn.sync_free
    assert levered.state_dict().keys() == on_cpu.state_dict().keys()


def test_sync_free_proposals_give_the_same_training_step():
    """accel.sync_free_postprocess in training: the RPN's proposals (and so the sampled RoIs, the
    losses and the gradients) are those of the default path."""
    base = tiny_c4().train()
    fast = optimize_for_training(copy.deepcopy(base), channels_last=True)
    levered = optimize_for_training(copy.deepcopy(base), channels_last=True,
                                    levers=Levers(sync_free_postprocess=True))
    assert levered.rpn.sync_free and not fast.rpn.sync_free
    assert_same_step(losses_and_grads(fast), losses_and_grads(levered), rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # torch.compile of the trunk: seconds to a minute here
def test_a_compiled_trunk_gives_the_same_training_step():
    """accel.compile in training (CUDA's plan applied on the CPU): the trunk and the Res5Runner's
    head compiled give the same losses and gradients as the eager fast path, on a ResNet-18 trunk
    and on bottleneck blocks with the hoisted convs, and the checkpoint keys unchanged."""
    for base in (make_model().train(), tiny_c4().train()):
        torch.manual_seed(0)
        eager = optimize_for_training(copy.deepcopy(base), channels_last=True)
        plan = training_plan("cuda", channels_last=True, levers=Levers(compile="default"))
        compiled = apply_training_plan(copy.deepcopy(base), plan)
        assert compiled.trunk._compiled_call_impl is not None
        assert isinstance(compiled.roi_heads.res5_runner.head_fn, CompiledModule)
        assert compiled.state_dict().keys() == eager.state_dict().keys()
        # float32 sums in another order (the compiled graph's): equal up to rounding
        assert_same_step(losses_and_grads(eager), losses_and_grads(compiled), rtol=1e-3, atol=2e-3)


@pytest.mark.slow  # two short training runs
def test_the_trainer_applies_the_training_levers(tmp_path):
    """train() with accel.sync_free_postprocess: the trainer's fast path takes the config's levers
    (the model it returns selects proposals sync-free) and the run's losses are those without."""
    from detection.data.shapes import generate_shapes
    from detection.engine.trainer import train
    from tests.helpers import tiny_cfg

    generate_shapes(tmp_path / "data" / "shapes", num_train=6, num_val=2, seed=0, image_size=(64, 80))
    extra = {"model.fast_path": True, "solver.max_iter": 2, "log_period": 1}
    models, losses = {}, {}
    for name, on in (("fast", False), ("levered", True)):
        models[name] = train(tiny_cfg(tmp_path / "data", tmp_path / name, **extra,
                                      **{"accel.sync_free_postprocess": on}))
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["total_loss"] for line in lines if "total_loss" in line]
    assert models["levered"].rpn.sync_free and not models["fast"].rpn.sync_free
    assert len(losses["fast"]) == 2 and losses["levered"] == pytest.approx(losses["fast"], rel=1e-5)
