from setuptools import find_packages, setup

# Ranges for users: they admit what pip resolves today and what the GPU machines carry (torch 2.11,
# triton 3.6, torchvision 0.26). CI and `make test` install the exact versions of
# requirements/ci-lock.txt; `make test-device` those of requirements/device-lock.txt.
TRAIN = ["torchvision>=0.21", "scikit-learn>=1.3", "scikit-image>=0.22", "torchmetrics>=1.0",
         "tqdm>=4.60", "matplotlib>=3.7", "mlxtend>=0.23"]
# The U-Net libraries fusedskip.convert is tested against (users need none of them to convert).
UNET_LIBRARIES = ["timm>=1.0,<2", "segmentation-models-pytorch>=0.6,<0.7", "monai>=1.6,<1.7", "diffusers>=0.42,<0.43"]
PYTEST = ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100"]
TEST = TRAIN + UNET_LIBRARIES + PYTEST + ["pytest-benchmark>=4", "ruff>=0.6"]
# The GPU machines' stack (no registry there): what the kernel subset and the sm_90 check need.
DEVICE = ["torchvision>=0.21"] + PYTEST
BENCH = ["pytest-benchmark>=4", "matplotlib>=3.7", "tqdm>=4.60"]
EXTRAS = {"train": TRAIN, "test": TEST, "bench": BENCH, "device": DEVICE}

setup(
    name="fusedskip",
    version="0.1.0",
    description="Fused Triton kernels for U-Net building blocks: gated additive skips, norm + activation, ConvNormAct",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fusedskip", "fusedskip.*"]) + ["fusedskip.kernels"],
    package_dir={"fusedskip.kernels": "kernels"},
    install_requires=["torch>=2.6", "triton>=3.2", "numpy>=1.24"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fusedskip=fusedskip.cli:main"]},
)
