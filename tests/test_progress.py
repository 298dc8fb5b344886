"""Progress lines where no bar is drawn: a batch job's log heard nothing for the hours an
evaluation or a folder of images took (tqdm draws on a terminal only)."""
import logging

import torch

import detection.utils.progress
from detection.utils.progress import ProgressLines


def test_a_line_at_most_every_period_with_the_rate_and_what_is_left():
    now, said = [0.0], []
    lines = ProgressLines("inference", 300, say=said.append, period_s=60, clock=lambda: now[0])
    for _ in range(300):
        now[0] += 0.5  # half a second an image: a line every 120 images
        lines.step()
    assert said == ["inference: 120/300 images, 0.500 s / image, eta 0:01:30",
                    "inference: 240/300 images, 0.500 s / image, eta 0:00:30"]
    quiet = ProgressLines("inference", None, say=said.append, enabled=False, period_s=0, clock=lambda: now[0])
    quiet.step(5)
    assert len(said) == 2  # a drawn bar (or another process) reports instead
    times = iter([0.0, 1.0])  # started, then a second later
    unknown = ProgressLines("visualize", None, say=said.append, period_s=0, clock=lambda: next(times))
    unknown.step(3)
    assert said[-1] == "visualize: 3 images, 0.333 s / image"


def test_evaluation_off_a_terminal_says_how_far_it_is(monkeypatch, caplog):
    from detection.evaluation.inference import inference_on_dataset

    class Evaluator:
        def reset(self):
            self.n = 0

        def process(self, records, outputs):
            self.n += len(records)

        def evaluate(self):
            return {"AP": 1.0}

    class Model(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                    for _ in images]

    loader = torch.utils.data.DataLoader(list(range(6)), batch_size=2,
                                         collate_fn=lambda batch: ([torch.zeros(3, 8, 8)] * len(batch), batch))
    monkeypatch.setattr(detection.utils.progress, "PERIOD_S", 0.0)  # every batch, for the test
    with caplog.at_level(logging.INFO):
        assert inference_on_dataset(Model(), loader, Evaluator()) == {"AP": 1.0}
    said = [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("inference: ") and "/6" in r.getMessage()]
    assert [line.split(",")[0] for line in said] == ["inference: 2/6 images", "inference: 4/6 images",
                                                     "inference: 6/6 images"], said
    assert "eta" in said[0]
