"""densedet: one-stage dense object detection (RetinaNet, RefineDet) on PyTorch."""

__version__ = "0.1.0"
