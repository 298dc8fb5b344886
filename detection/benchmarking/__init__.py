"""What tools/benchmark.py measures: the models it compares and how it runs them stage by stage
(models.py), and the medians, ratios and printed table of its report (report.py)."""
