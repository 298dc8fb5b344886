"""The detector: Faster R-CNN's parts (anchors, RPN, RoI heads, box coding, matching,
sampling), the image resize, and the test-time extras (box refinement, multi-scale, TTA,
autocast). Built from keyword arguments; knows nothing of configs, data sets or training.

Imports nothing here, so `detection.modeling.resize` (used by the torch-free ONNX
preprocessing) can be imported without torch."""
