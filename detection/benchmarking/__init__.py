"""What tools/benchmark.py measures, one module per part; the tool parses its options, calls
suite.run and prints the report.

- suite.py: every section in order, the raw report
- models.py: the models compared (ours, torchvision's C4 with our weights), the tool's config,
  synthetic inputs, the training step and the forward-pass recorders
- meters.py: wall / CPU time, FLOPs and peak GPU memory of a block; the interleaved runs
- hardware.py: the machine's matmul and 3x3-convolution throughput
- inference.py, training.py, memory.py, data.py, onnx_runtime.py: the sections
- profiling.py: per-stage seconds and FLOPs read from torch.profiler and our c4det.* labels
- report.py: medians, ratios, the equal-work check, the targets and the printed table
"""
