"""The detector: Faster R-CNN's parts (anchors, RPN, RoI heads, box coding, matching,
sampling), the image resize, and the test-time extras (box refinement, multi-scale, TTA,
autocast), and their training losses. The parts are built from keyword arguments; only the
build_* functions (build_model, build_tta) read a Config; nothing here knows data sets or the
training loop.

Imports nothing here, so `detection.modeling.resize` (used by the torch-free ONNX
preprocessing) can be imported without torch."""
