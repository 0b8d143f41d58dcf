"""img2vec: a fast Img2Vec masked-image-modeling trainer (Triton kernels, DALI, DeepSpeed ZeRO)."""
import sys

from setuptools import setup

# Ranges are chosen so the torch 2.14.1 / torchvision 0.29.1 wheels that ship with our
# machines satisfy them; nothing here forces a new torch download.
install_requires = [
    "torch>=2.4,<=2.14.1",
    "torchvision>=0.19,<=0.29.1",
    "timm>=1.0",
    "triton>=3.0",
    "deepspeed>=0.16",
    "safetensors>=0.4",
    "tensorboard>=2.14",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "scikit-image>=0.21",
    "scikit-learn>=1.3",  # bundles china.jpg / flower.jpg and the digits data set
    "pyyaml>=6.0",
    "pillow>=10.0",
    "numpy>=1.24",
]
if sys.platform.startswith("linux"):
    install_requires.append("nvidia-dali-cuda130>=2.0")

setup(
    name="img2vec",
    version="0.1.0",
    description="Performance-optimized Img2Vec masked image modeling trainer",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["kernels", "img2vec", "img2vec.eval", "dataloading"],
    install_requires=install_requires,
    extras_require={
        "dev": ["pytest>=8.0", "pytest-benchmark>=4.0", "pytest-timeout>=2.2", "pytest-xdist>=3.5"],
        # xformers' wheels are built for one torch/CUDA pair; it is only ever an optional backend.
        "xformers": ["xformers"],
    },
    # Each command is also `python -m <module>`; train and finetune stay scripts for the DeepSpeed
    # launcher too (`deepspeed img2vec/train.py ...`): img2vec-train is the one-process form of it.
    entry_points={"console_scripts": [
        "img2vec-train = img2vec.train:main",
        "img2vec-finetune = img2vec.finetune:main",
        "img2vec-knn = img2vec.eval.knn:main",
        "img2vec-linear-probe = img2vec.eval.linear_probe:main",
        "img2vec-export = img2vec.export:main",
        "img2vec-visualize = img2vec.visualize:main",
        "img2vec-diversity = img2vec.diversity:main",
        "img2vec-memory = img2vec.memory:main",
        "img2vec-verify = dataloading.verify:main",
        "img2vec-digits = dataloading.digits:main",
    ]},
    license="Apache-2.0",
)
