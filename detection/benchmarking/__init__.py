"""What tools/benchmark.py measures: the models it compares (models.py), their per-stage
seconds and FLOPs read from torch.profiler and our model's record_function labels
(profiling.py), and the medians, ratios, equal-work check and printed table of its report
(report.py)."""
