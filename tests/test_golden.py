"""Golden values: numbers of a seeded tiny detector on a fixed batch, stored as constants.

The fast-vs-plain equality tests (tests/test_fast.py) cannot see a change that moves both
paths at once; these can. A failure here means the numbers the detector computes changed.

How the constants were obtained: `python -m pytest tests/test_golden.py` with the code of the
commit that added them (torch 2.14.1 CPU, one thread), printing the values the tests compute
below (seed 0 for the weights, seed 1 for the RPN / RoI sampling) and pasting them here, at
full float32 precision.

When they may be updated: only by a commit that changes the numbers on purpose (a change to
initialisation, anchors, matching, sampling, box coding, pooling, the loss normalisation,
proposal selection, or the painted batch in tests/helpers.py), or a torch upgrade that
changes the random initialisation; that commit says why. A refactoring must leave them as they
are. The tolerance (rtol 1e-4) admits only float rounding differences between CPUs.
"""
import pytest
import torch

from tests.helpers import IMAGES, TARGETS, make_model

RTOL, ATOL = 1e-4, 1e-4

# make_model() after torch.manual_seed(0), train mode, torch.manual_seed(1), then
# model(IMAGES, TARGETS): ResNet-18 with GroupNorm, images 96x128 and 112x96, K = 2.
GOLDEN_LOSSES = {
    "loss_rpn_cls": 0.7018488645553589,
    "loss_rpn_box": 0.023969557136297226,
    "loss_cls": 1.0887411832809448,
    "loss_box": 0.7695759534835815,
}

# The same model in eval mode: the RPN's first 5 proposals (XYXY pixels, sorted by
# objectness, after NMS) for each image of the batch at its own size (no resize at 96 px).
GOLDEN_TOP5_PROPOSALS = [
    [[44.97745132446289, 8.788040161132812, 128.0, 52.22876739501953],
     [43.79960632324219, 43.76655578613281, 128.0, 86.42948913574219],
     [43.30222702026367, 27.518619537353516, 128.0, 69.90386962890625],
     [38.59878158569336, 17.91998291015625, 115.92710876464844, 84.29940795898438],
     [9.408493041992188, 0.0, 98.05210876464844, 20.546184539794922]],
    [[0.0, 27.833438873291016, 78.22538757324219, 70.4075927734375],
     [33.97998809814453, 54.893211364746094, 96.0, 99.61554718017578],
     [20.811901092529297, 23.333223342895508, 96.0, 65.9551010131836],
     [23.651683807373047, 8.208858489990234, 96.0, 51.29400634765625],
     [2.664186477661133, 16.093364715576172, 31.44627571105957, 55.310367584228516]],
]


@pytest.fixture
def one_thread():
    """Reductions are summed in a thread-dependent order: pin one thread for these numbers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seeded_model():
    torch.manual_seed(0)
    return make_model()


def test_losses_of_the_seeded_tiny_model_are_the_golden_values(one_thread):
    model = seeded_model().train()
    torch.manual_seed(1)  # the RPN's anchor and the heads' RoI sampling
    with torch.no_grad():
        losses = model(IMAGES, TARGETS)
    assert set(losses) == set(GOLDEN_LOSSES)
    for key, value in GOLDEN_LOSSES.items():
        torch.testing.assert_close(losses[key], torch.tensor(value), rtol=RTOL, atol=ATOL, msg=key)


def test_top_proposals_of_the_seeded_tiny_model_are_the_golden_values(one_thread):
    model = seeded_model().eval()
    with torch.no_grad():
        batch = model.preprocess(IMAGES, resize=True)
        proposals, _ = model.rpn(model.trunk(batch.tensor), batch.image_sizes)
    assert batch.image_sizes == [(96, 128), (112, 96)]
    for image, (got, expected) in enumerate(zip(proposals, GOLDEN_TOP5_PROPOSALS)):
        torch.testing.assert_close(got[:5], torch.tensor(expected), rtol=RTOL, atol=ATOL,
                                   msg=f"image {image}")
