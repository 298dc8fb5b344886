"""Install the `detection` and `backbones` packages.

The torch / torchvision ranges admit the 2.14.1 / 0.29.1 wheels that ship on the
development machines, so no newer (multi-GB) build is ever pulled in.
"""
from setuptools import find_packages, setup

setup(
    name="c4det",
    version="0.1.0",
    description="Faster R-CNN with ResNet C4 backbones (He et al. 2016), trained and evaluated on VOC and COCO",
    python_requires=">=3.10",
    packages=find_packages(include=["detection", "detection.*", "backbones", "backbones.*"]),
    install_requires=[
        "torch>=2.1,<=2.14.1",
        "torchvision>=0.16,<=0.29.1",
        "pycocotools>=2.0.6",
        "albumentations>=2.0,<2.1",
        "opencv-python-headless>=4.8",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "numpy>=1.24",
        "pillow>=9",  # Detectron2's resize (input.resize_mode: detectron2); torchvision requires it too
    ],
    extras_require={
        "dev": ["pytest>=7", "matplotlib>=3.7"],
        "plots": ["matplotlib>=3.7"],
        "export": ["onnx>=1.14", "onnxruntime>=1.16"],  # tools/export.py (ONNX export, checked with ONNX Runtime)
        "report": ["jinja2>=3.0", "matplotlib>=3.7"],  # tools/eval.py's inference/report.html
        "tensorboard": ["tensorboard>=2.10"],  # the trainer's event files (log.tensorboard)
    },
)
