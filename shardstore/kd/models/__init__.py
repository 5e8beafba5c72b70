"""Teacher and student models for distillation: built-in ResNets, ViTs and a small CNN, timm models, and loading.

Every model maps a normalised batch [B, C, H, W] to logits [B, num_classes] and has `num_features`,
`forward_features(x)` (the pooled embedding) and `forward_head(features)` (the classifier).
"""

from __future__ import annotations

from shardstore.kd.models.io import InputAdapter, ScriptedModel, freeze, load_checkpoint_into, load_torchscript
from shardstore.kd.models.registry import MODELS, TimmModel, build_model
from shardstore.kd.models.resnet import ResNet, SmallCNN, resnet
from shardstore.kd.models.vit import VisionTransformer, vit

__all__ = [
    "MODELS",
    "InputAdapter",
    "ResNet",
    "ScriptedModel",
    "SmallCNN",
    "TimmModel",
    "VisionTransformer",
    "build_model",
    "freeze",
    "load_checkpoint_into",
    "load_torchscript",
    "resnet",
    "vit",
]
