"""The learning verdict (img2vec/verdict.py): its line, its metrics, its data, and that it can fail."""
import os

import pytest
import torch

from train_helpers import shared_dir

from dataloading import sample_dataset_dir
from img2vec.eval.common import build_encoder
from img2vec.verdict import Verdict, learning_verdict, verdict_splits


@pytest.fixture
def photo_cache(tmp_path_factory, monkeypatch):
    """A cache that holds the photo verdict set and the seed-0 sample set, built once per session:
    the default cache of the tests that use it."""
    def build(folder):
        verdict_splits("photos", cache_dir=folder)
        sample_dataset_dir(cache_dir=folder)

    monkeypatch.setenv("IMG2VEC_CACHE", str(shared_dir(tmp_path_factory, "verdict_cache", build)))


def test_line_and_metrics():
    v = Verdict(71.25, 58.0, "photos")
    assert v.line() == "learned: kNN top-1 71.2% vs 58.0% at random init (+13.2)"
    assert Verdict(50.0, 55.5, "photos").line() == ("not learned: kNN top-1 50.0% vs 55.5% at random init (-5.5): "
                                                    "the pretrained encoder is no better than its random init")
    assert Verdict(60.0, 60.0, "photos").line().startswith("not learned: ")
    assert v.metrics() == {"verdict_knn_top1": 71.25, "verdict_knn_top1_random_init": 58.0}


def test_photo_splits_are_held_out_and_share_classes(photo_cache):
    train, val = verdict_splits("photos")
    classes = sorted(os.listdir(train))
    assert classes == sorted(os.listdir(val)) and len(classes) >= 10
    files = lambda root: {f for c in classes for f in os.listdir(os.path.join(root, c))}  # noqa: E731
    assert len(files(train)) == len(files(val)) == 256
    # the training set is the sample recipe at seed 0: same photographs, other crops
    seed0 = sample_dataset_dir()
    def first_file(root):
        folder = os.path.join(root, classes[0])
        with open(os.path.join(folder, sorted(os.listdir(folder))[0]), "rb") as f:
            return f.read()

    assert len({first_file(train), first_file(val), first_file(seed0)}) == 3


def test_unknown_verdict_data_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="photos or digits"):
        verdict_splits(str(tmp_path))


def test_same_encoder_gives_zero_gain_and_a_better_one_a_positive_gain(photo_cache):
    """Two copies of one random init score the same; an encoder whose patch embedding sees the
    mean colour of each patch (a crude but real photo feature) beats a constant one."""
    kw = dict(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=2)
    torch.manual_seed(0)
    a = build_encoder(kw).eval()
    b = build_encoder(kw).eval()
    b.load_state_dict(a.state_dict())
    same = learning_verdict(a, b, 32)
    assert same.gain == 0.0 and 0 < same.pretrained <= 100
    dead = build_encoder(kw).eval()
    with torch.no_grad():
        for p in dead.parameters():
            p.zero_()  # every image -> the same features: kNN is at chance
    v = learning_verdict(a, dead, 32)
    assert v.gain > 20, v.line()
