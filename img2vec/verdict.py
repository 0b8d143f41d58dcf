"""The learning verdict: did pretraining teach the encoder anything a random init does not know?

kNN top-1 (img2vec.eval.knn: cosine, k = 20, T = 0.07) on a held-out labeled set that ships
offline, for the trained encoder and for the same architecture at its random init (the same
seed builds the same initial weights), as one line:

    learned: kNN top-1 71.3% vs 58.0% at random init (+13.3)

The labeled sets (`verdict_splits`):
    photos  new random crops of the bundled sample photographs, labeled by the photograph they
            come from (18 classes): kNN train = the sample recipe at seed 1, val = at seed 2;
            the training set is seed 0, so no file is shared with it. The default: it is the
            domain the embedded default trains on (photographs at its image size), so it asks
            "do the features tell these textures and scenes apart better than random ones?".
            The photographs themselves are the training ones: it measures what was learned
            about them, not transfer to new photographs.
    digits  scikit-learn's 8x8 handwritten digits (10 classes, stratified 75/25 split),
            upscaled to the encoder's image size: held out in every sense, but out of domain for
            a model pretrained on photographs (see docs for the measured numbers of both).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

VERDICT_SETS = ("photos", "digits")
PHOTOS_TRAIN_SEED, PHOTOS_VAL_SEED = 1, 2  # the training set is the sample recipe at seed 0
PHOTOS_IMAGES = 256  # per split, ~14 per photograph


@dataclass(frozen=True)
class Verdict:
    """kNN top-1 (percent) of the trained encoder and of its random init on one labeled set."""
    pretrained: float
    random_init: float
    data: str

    @property
    def gain(self) -> float:
        return self.pretrained - self.random_init

    def line(self) -> str:
        """The run's last line; it says "learned" only for a gain over the random init."""
        figures = f"kNN top-1 {self.pretrained:.1f}% vs {self.random_init:.1f}% at random init ({self.gain:+.1f})"
        if self.gain > 0:
            return f"learned: {figures}"
        return f"not learned: {figures}: the pretrained encoder is no better than its random init"

    def metrics(self) -> dict[str, float]:
        """The metrics.jsonl entries."""
        return {"verdict_knn_top1": self.pretrained, "verdict_knn_top1_random_init": self.random_init}


def _photos_splits(cache_dir) -> tuple[str, str]:
    """train/ and val/ ImageFolders of held-out sample-photo crops, built once in the cache."""
    from dataloading.sample_data import build_once, cache_root, sample_dataset_dir

    def build(tmp: Path) -> None:
        for split, seed in (("train", PHOTOS_TRAIN_SEED), ("val", PHOTOS_VAL_SEED)):
            src = sample_dataset_dir(cache_dir, num_images=PHOTOS_IMAGES, seed=seed)
            shutil.copytree(src, tmp / split, ignore=shutil.ignore_patterns("*.txt"))
        (tmp / "files.txt").write_text("train/ and val/: sample-photo crops labeled by photograph\n")

    root = build_once(cache_root(cache_dir) / f"verdict_photos_v1-n{PHOTOS_IMAGES}", build, "verdict set")
    return str(root / "train"), str(root / "val")


def verdict_splits(data: str = "photos", cache_dir=None) -> tuple[str, str]:
    """(train_dir, val_dir) of a verdict set: "photos", "digits", or a folder with train/ and val/."""
    if data == "photos":
        return _photos_splits(cache_dir)
    if data == "digits":
        from dataloading.digits import digits_dataset_dir

        root = digits_dataset_dir(cache_dir)
        return str(root / "train"), str(root / "val")
    if all(os.path.isdir(os.path.join(data, s)) for s in ("train", "val")):
        return os.path.join(data, "train"), os.path.join(data, "val")
    raise ValueError(f"verdict data must be {' or '.join(VERDICT_SETS)} or a folder with train/ and val/, "
                     f"got {data!r}")


def learning_verdict(encoder: torch.nn.Module, init_encoder: torch.nn.Module, image_size: int,
                     data: str = "photos", pool: str = "avg", device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, cache_dir=None) -> Verdict:
    """kNN top-1 of `encoder` and of `init_encoder` (its random init) on the verdict set.

    Encoders map images (B, 3, image_size, image_size) -> tokens (B, 1 + N, D); pool "avg"
    (mean patch token) or "cls". Every rank may call it; the numbers are the same on each.
    """
    from torch.utils.data import DataLoader, TensorDataset

    from dataloading.datasets import SkipLog
    from img2vec.eval.common import eval_transform, extract_features, labeled_split
    from img2vec.eval.knn import knn_accuracy

    train_dir, val_dir = verdict_splits(data, cache_dir)
    transform = eval_transform(image_size, crop_pct=1.0)  # the held-out crops are already squares of this size
    splits = [labeled_split(d, transform) for d in (train_dir, val_dir)]  # unreadable files left out
    if splits[0].classes != splits[1].classes:
        raise ValueError(f"train and val class folders differ: {splits[0].classes} vs {splits[1].classes}")
    skips, tensors = SkipLog(), []  # each unreadable file named once in the log
    for split in splits:  # decode once, for both encoders: (n, 3, S, S) images and (n,) labels
        samples = [split[i] for i in range(len(split))]  # (image or None, label, files skipped)
        skips.add([skip for _, _, skipped in samples for skip in skipped])
        kept = [(image, label) for image, label, _ in samples if image is not None]
        tensors.append(TensorDataset(torch.stack([image for image, _ in kept]),
                                     torch.tensor([label for _, label in kept])))
    scores = []
    for encoder in (encoder, init_encoder):
        encoder = encoder.to(device)
        (tx, ty), (vx, vy) = (extract_features(encoder, DataLoader(t, batch_size=256), pool,
                                               torch.device(device), dtype) for t in tensors)
        scores.append(knn_accuracy(tx, ty, vx, vy, len(splits[0].classes))["top1"])
    return Verdict(scores[0], scores[1], data)


def run_verdict(run_dir: str, seed: int, data: str = "photos", pool: str = "avg",
                device: torch.device | str = "cpu", cache_dir=None) -> Verdict:
    """The verdict of an exported run: its encoder against the same seed's random init."""
    from img2vec.eval.common import load_encoder

    trained = load_encoder(run_dir)
    init = load_encoder(run_dir, init="random", seed=seed)
    return learning_verdict(trained, init, trained.image_size, data, pool, device, cache_dir=cache_dir)


def write_verdict(run_dir: str, step: int, seed: int, data: str = "photos", pool: str = "avg",
                  device: torch.device | str = "cpu", cache_dir=None) -> Verdict:
    """The end-of-run verdict of train.py (rank 0, after the export): computed from the exported
    encoder, its two numbers appended to run_dir/metrics.jsonl as one row at `step`."""
    verdict = run_verdict(run_dir, seed, data, pool, device, cache_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **verdict.metrics()}) + "\n")
    return verdict
