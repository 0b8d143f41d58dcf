"""Data loading for Img2Vec pretraining: batches {"images": (B, 3, H, W), "index": (B,)}.

A leaf package: it imports neither img2vec nor kernels and takes plain arguments.
`build_loader(LoaderSpec(...))` picks the backend (DALI, GPU or CPU pipeline, or the
torchvision loader) and hides which one runs; what cannot start a run raises `DataError`
(a ValueError) with one line; `ImageDataset` is the reference decode + augmentation path;
`open_source` reads ImageFolder trees, file lists and WebDataset shards;
`sample_dataset_dir()` builds the offline sample set of real JPEGs;
`python -m dataloading.verify PATH` lists the files training would skip.

Modules, imports pointing down: sources (listing, checks, errors) <- datasets (decode,
augmentation) <- base (spec, sampler, loader interface) <- torch_loader, dali (the two
backends) <- loader (build_loader, the only place that chooses).

Names are imported on first use (PEP 562), so the command-line tools (verify, the tar
indexer) start without importing torch.
"""
import importlib

_EXPORTS = {
    "BaseLoader": "base", "LoaderSpec": "base", "ImageLoader": "torch_loader", "build_loader": "loader",
    "resolve_backend": "loader", "ImageDataset": "datasets", "sample_dataset_dir": "sample_data",
    "open_source": "sources", "DataError": "sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dataloading' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
