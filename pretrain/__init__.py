"""Shared core of medssl: backbones, data readers and loaders, transforms, checkpoints, pretraining."""

__version__ = "0.1.0"
