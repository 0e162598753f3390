"""The sequential recommender and its checkpoint format."""
from .checkpoint import load_checkpoint, save_checkpoint
from .recommender import ModelConfig, Recommender

__all__ = ["ModelConfig", "Recommender", "load_checkpoint", "save_checkpoint"]
