"""The sequential recommender and its checkpoint format."""
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .recommender import ModelConfig, Recommender

__all__ = ["Checkpoint", "ModelConfig", "Recommender", "load_checkpoint", "save_checkpoint"]
