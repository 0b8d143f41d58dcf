"""Data loading for Img2Vec pretraining: batches {"images": (B, 3, H, W), "index": (B,)}.

A leaf package: it imports neither img2vec nor kernels and takes plain arguments.
`build_loader(LoaderSpec(...))` picks the backend (torchvision today; DALI later),
`ImageDataset` is the reference decode + augmentation path, and `sample_dataset_dir()`
builds the offline sample set of real JPEGs.
"""
from .datasets import ImageDataset
from .loader import ImageLoader, LoaderSpec, build_loader
from .sample_data import sample_dataset_dir

__all__ = ["ImageDataset", "ImageLoader", "LoaderSpec", "build_loader", "sample_dataset_dir"]
