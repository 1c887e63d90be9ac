"""Fusion variants. Each is one class here plus one YAML file in `conf/model/fusion/`; the file name is
the variant's key and its `_target_` the class, so the config directory is the registry.

Every variant takes image tokens + mask (B images), text tokens + mask (Q questions, already projected
to the model width) and `img_idx` (Q,), the image of each question, and returns a `FusionOutput`.
Each variant gathers image features per question as late as it can, so per-image work is done once.
"""

from mmqa.models.fusion.anchored import AnchoredFusion
from mmqa.models.fusion.cross import CrossFusion
from mmqa.models.fusion.early import EarlyFusion
from mmqa.models.fusion.late import LateFusion
from mmqa.models.fusion.relation import RelationFusion

__all__ = ["AnchoredFusion", "CrossFusion", "EarlyFusion", "LateFusion", "RelationFusion"]
