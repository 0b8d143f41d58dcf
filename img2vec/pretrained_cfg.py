"""The timm `pretrained_cfg` of an exported encoder: how its inputs must be prepared.

encoder.json carries it beside the timm kwargs, so timm's own data pipeline reproduces ours:

    cfg = timm.data.resolve_data_config(pretrained_cfg=json.load(open("encoder.json"))["pretrained_cfg"])
    transform = timm.data.create_transform(**cfg)   # = img2vec.eval.common.eval_transform(image_size)

Our evaluation transform resizes the short side to input size / crop_pct (bicubic) and center-crops
the input size: timm's crop_pct (0.875, as MAE and DINO evaluate), crop_mode "center".
Normalization is ImageNet's mean and std, as in training.
"""
from dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD

EVAL_CROP_PCT = 0.875  # MAE, dBOT, DINO: resize to 256, center crop 224


def timm_pretrained_cfg(timm_kwargs: dict) -> dict:
    """pretrained_cfg for VisionTransformer(**timm_kwargs); img_size an int or (H, W)."""
    size = timm_kwargs["img_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return {"input_size": [3, height, width], "interpolation": "bicubic", "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "crop_pct": EVAL_CROP_PCT, "crop_mode": "center", "num_classes": 0,
            "first_conv": "patch_embed.proj", "classifier": "head"}
