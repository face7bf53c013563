"""Public entry point of `lisa-train` (lisa_dist/recipe/train.py), also as `python -m lisa_dist.train`
(what the launchers run: deepspeed --module, torchrun -m, mpirun, srun)."""
import sys

from lisa_dist.recipe.train import main, parse_args, train

__all__ = ["main", "parse_args", "train"]

if __name__ == "__main__":
    sys.exit(main())
