"""img2vec: Img2Vec masked image modeling (a ViT student regresses a frozen teacher's patch features).

A small Python API; each name is imported on first use, so `import img2vec` stays cheap:

    from img2vec import Config, build_student, Teacher, masked_feature_loss, load_encoder

    cfg = Config(model="vit_small", image_size=224)                     # the run config, validated by .validate()
    teacher = Teacher("resnet50", 3, "r50.safetensors", patch_size=16, image_size=224)  # (B, 3, H, W) -> (B, N, C)
    student = build_student("vit_small", 224, 16, teacher.channels, 8, 512, 16)  # decoder depth, width, heads
    loss = masked_feature_loss(pred, target, ids_masked)               # fused on CUDA, reference elsewhere
    encoder = load_encoder("runs/img2vec")                             # an export, run folder or checkpoint

The commands (img2vec-train, img2vec-knn, ...) are the modules' `main` functions; setup.py lists them.
"""

__all__ = ["Config", "FinetuneConfig", "build_student", "Teacher", "masked_feature_loss", "load_encoder"]


def masked_feature_loss(pred, target, ids_masked, beta: float = 2.0, eps: float = 1e-6, impl: str = "auto"):
    """Smooth-L1 between pred and the layer-normed target on the masked patches, a scalar.

    pred (B, N, C) or (B, M, C) in ids_masked order, target (B, N, C), ids_masked (B, M).
    impl: auto (the fused Triton kernel on CUDA, the PyTorch reference elsewhere) | triton | reference.
    """
    from img2vec.fastpaths import resolve_loss

    return resolve_loss(impl, pred.device)[1](pred, target, ids_masked, beta, eps)


def __getattr__(name: str):
    # Each import is written out (not importlib by name) so tests/test_imports.py sees the edges.
    if name == "Config":
        from img2vec.config import Config
        return Config
    if name == "FinetuneConfig":
        from img2vec.config import FinetuneConfig
        return FinetuneConfig
    if name == "build_student":
        from img2vec.vit import build_student
        return build_student
    if name == "Teacher":
        from img2vec.teacher import Teacher
        return Teacher
    if name == "load_encoder":
        from img2vec.eval.common import load_encoder
        return load_encoder
    raise AttributeError(f"module 'img2vec' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
