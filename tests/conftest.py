"""Shared test set-up: small, seeded, single-machine CPU runs. Helpers several files use are
in tests/helpers.py; the `slow` marker (end-to-end runs) is registered here."""
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from detection.data.shapes import generate_shapes
from tests.helpers import TEST_CORES, shard_files

# One intra-op thread: on a 2-core machine where data-loader workers, spawned DDP ranks or
# another job compete for the cores, OpenMP's spinning threads make 2 threads many times
# slower than 1 (measured here), and the tests are small enough not to gain from 2.
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shard", metavar="I/N", default=None,
                     help="run the I-th of N parts of the collected tests: whole files, balanced by their measured "
                          "seconds (tests/parallel.py runs the N parts at once: `make test`)")
    parser.addoption("--failures-to", metavar="FILE", default=None,
                     help="append each failure's report to FILE as soon as it happens, not at the end "
                          "(tools/gpu_session.py: a suite stopped at its time limit keeps what failed and why)")


_failures_to: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _failures_to
    _failures_to = config.getoption("--failures-to", None)
    config.addinivalue_line("markers", "cuda: the GPU suite (tests/test_cuda.py, `make test-gpu`); skipped "
                                       "where torch.cuda.is_available() is False")
    config.addinivalue_line("markers", "slow: an end-to-end run (training, a tool's command line, "
                                       "a subprocess); `make test-fast` leaves these out")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _failures_to and report.failed:
        with open(_failures_to, "a") as file:
            file.write(f"{report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    shard = config.getoption("--shard")
    if not shard:
        return
    try:
        index, parts = (int(x) for x in shard.split("/"))
        assert 1 <= index <= parts
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"--shard: expected I/N with 1 <= I <= N, got {shard!r}") from None
    counts: dict[str, int] = {}
    for item in items:
        counts[item.nodeid.split("::")[0]] = counts.get(item.nodeid.split("::")[0], 0) + 1
    mine = set(shard_files(list(counts), counts, parts)[index - 1])
    kept = [item for item in items if item.nodeid.split("::")[0] in mine]
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid.split("::")[0] not in mine])
    items[:] = kept


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """A synthetic shapes data set (shapes_train, shapes_val, 64x80 images) under its own root,
    made once per test module: 6 training and 2 validation images, or as many as the module's
    SHAPES_IMAGES = (train, val) asks. A module defining its own data_root uses that instead."""
    num_train, num_val = getattr(request.module, "SHAPES_IMAGES", (6, 2))
    root = tmp_path_factory.mktemp("data")
    generate_shapes(root / "shapes", num_train=num_train, num_val=num_val, seed=0, image_size=(64, 80))
    return root


@pytest.fixture
def restore_logging():
    """The tools' main() adds a stderr handler to the root logger (detection.cli.setup_logging)
    and sets the project's log levels: take them away again after the test."""
    root = logging.getLogger()
    handlers, levels = list(root.handlers), {n: logging.getLogger(n).level for n in ("detection", "backbones")}
    shown = warnings.showwarning  # setup_logging shows the project's warnings as one line
    yield
    warnings.showwarning = shown
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="session")
def d2_files(tmp_path_factory):
    """The fixture's Detectron2 checkpoint (tests/fixtures/detectron2_c4, 135 MB), written once
    for the session (test_detectron2, test_predictor): model-zoo .pkl and trainer .pth."""
    fixture = Path(__file__).resolve().parent / "fixtures" / "detectron2_c4"
    out = tmp_path_factory.mktemp("detectron2")
    subprocess.run([sys.executable, str(fixture / "make_checkpoint.py"), str(fixture / "keys_R_50_C4_coco.json"),
                    "11", str(out / "model_final.pkl"), "--pth", str(out / "model_final.pth")], check=True)
    return out / "model_final.pkl", out / "model_final.pth"


@pytest.fixture
def both_cores():
    """Both cores for a test that runs the ResNet-50 detector at 800 px and nothing beside it
    (one thread is set above for the small tests); one where tests/parallel.py runs another
    pytest process beside this one (C4DET_TEST_CORES=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_CORES)
    yield
    torch.set_num_threads(before)
