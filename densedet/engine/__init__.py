from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, atomic_save, load_checkpoint, model_from_checkpoint

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "atomic_save", "load_checkpoint", "model_from_checkpoint"]
