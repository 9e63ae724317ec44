from setuptools import setup

# Version bounds admit what pip resolves today and what the GPU machines carry
# (torch 2.11, triton 3.6, torchvision 0.26).
setup(
    name="fusedskip",
    version="0.1.0",
    description="Fused Triton kernels for U-Net building blocks: gated additive skips, norm + activation, ConvNormAct",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fusedskip", "fusedskip.ops", "fusedskip.kernels"],
    package_dir={"fusedskip.kernels": "kernels"},
    install_requires=["torch>=2.6", "triton>=3.2", "numpy>=1.24"],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "hypothesis>=6.100", "torchvision>=0.21"],
    },
)
