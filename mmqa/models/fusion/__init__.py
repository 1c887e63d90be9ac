"""Fusion variants. Each is one class here plus one YAML file in `conf/model/fusion/`; the file name is
the variant's key and its `_target_` the class, so the config directory is the registry.

Every variant takes image tokens + mask and text tokens + mask (all already projected to the model
width) and returns a `FusionOutput`.
"""

from mmqa.models.fusion.cross import CrossFusion
from mmqa.models.fusion.early import EarlyFusion
from mmqa.models.fusion.late import LateFusion

__all__ = ["CrossFusion", "EarlyFusion", "LateFusion"]
