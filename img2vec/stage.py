"""What a teacher's targets are: shared by the timm teachers and the weight-free ones."""
from dataclasses import dataclass


@dataclass(frozen=True)
class StageInfo:
    """Where a teacher's targets come from: kind "cnn", "vit", "pixels" or "hog", feature index, module name."""
    kind: str
    index: int  # features_only out_indices entry: CNN stage or ViT block
    module: str  # e.g. "layer3", "blocks.6"
    stride: int  # input pixels per feature-map cell
    channels: int  # C
