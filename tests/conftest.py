"""Fixtures every test file may use: the sample set, a private cache, one CPU thread."""
import os

import pytest
import torch

from dataloading import sample_dataset_dir


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """64 real JPEGs (crops of the photographs bundled with scikit-image / scikit-learn)."""
    return sample_dataset_dir(cache_dir=tmp_path_factory.mktemp("cache"), num_images=64, seed=0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sample sets, scan caches and tar indexes go to a fresh directory, never the user's cache."""
    monkeypatch.setenv("IMG2VEC_CACHE", str(tmp_path_factory.mktemp("img2vec_cache")))


@pytest.fixture
def one_thread():
    """Pin torch to one CPU thread: on 2 shared cores two threads swing timings and stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): one worker per core, at most 8. Each end-to-end test starts training
    processes of over 1 GB each, so a many-core machine would otherwise run out of memory first."""
    return min(len(os.sched_getaffinity(0)), 8)
