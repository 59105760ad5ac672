"""Shared core of medssl: backbones, data readers and loaders, transforms, checkpoints, pretraining."""

import os

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs (a laptop, a CI
# runner, data-loader workers), spinning threads made every training step several times slower;
# on a quiet machine it changes little. Only effective before torch is first imported; a user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
