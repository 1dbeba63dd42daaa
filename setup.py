from setuptools import find_packages, setup

# torch is deliberately not pinned here: install the right build for the machine first
# (CPU: `pip install torch==2.13.0`; a GPU cluster keeps its own CUDA torch). A bare `torch`
# requirement on a CPU machine would pull a multi-GB CUDA build.
setup(
    name="asset_dist",
    version="0.1.0",
    description="Cluster-scale training and batch editing for ASSET (semantic scene editing at high resolution)",
    packages=find_packages(include=["asset_dist", "asset_dist.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "webdataset>=0.2.90",
        "numpy",
        "pillow",
        "tensorboard",
        "pyyaml",
        "submitit",
        "tqdm",
        "scipy",
    ],
    extras_require={"dev": ["pytest", "pytest-timeout"]},
    entry_points={"console_scripts": ["asset-dist=asset_dist.cli:main"]},
)
