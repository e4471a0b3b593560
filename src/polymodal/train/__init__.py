"""Training: one loop (`fit`) with a pluggable `loss_fn(model, batch)`, atomic resumable checkpoints,
DDP/FSDP2 under torchrun, and the recipes registry (`RECIPES`, `run`). See docs/training.md."""

from polymodal.train.checkpointing import CheckpointDir
from polymodal.train.config import ConfigError, TrainConfig, apply_overrides
from polymodal.train.data import ShuffledBatches
from polymodal.train.distributed import World, init_world
from polymodal.train.engine import Task, TrainingInterrupted, fit, freeze, param_groups
from polymodal.train.losses import contrastive_loss
from polymodal.train.recipes import RECIPES, Recipe, recipe_config, run

__all__ = ["RECIPES", "CheckpointDir", "ConfigError", "Recipe", "ShuffledBatches", "Task", "TrainConfig",
           "TrainingInterrupted", "World", "apply_overrides", "contrastive_loss", "fit", "freeze", "init_world",
           "param_groups", "recipe_config", "run"]
