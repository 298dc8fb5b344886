"""ONNX export (`onnx`: trace the model's own inference code, check it with ONNX Runtime,
`OnnxDetector` to run the file) and the torch-free preprocessing a deployed model needs
(`preprocess`). Imports nothing here, so the preprocessing stays importable without torch."""
