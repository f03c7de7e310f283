"""densedet: one-stage dense object detection (RetinaNet, RefineDet) on PyTorch."""

from .models import build_model, list_models

__version__ = "0.1.0"
__all__ = ["build_model", "list_models", "__version__"]
