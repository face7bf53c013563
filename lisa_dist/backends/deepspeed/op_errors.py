"""A clear error when DeepSpeed cannot build one of its compiled optimizers.

With an "Adam"/"AdamW" optimizer section DeepSpeed picks FusedAdam on GPUs and, with
offload_optimizer, DeepSpeedCPUAdam; both are C++/CUDA ops compiled on first use (nvcc or a C++
compiler, ninja, CUDA_HOME). Where they cannot be built the user gets a compiler log from deep
inside deepspeed.initialize; this names the config change that avoids the build instead.
"""
from __future__ import annotations

from contextlib import contextmanager

_SIGNS = ("error building extension", "cuda_home", "ninja", "nvcc", "unable to jit load", "unable to compile",
          "op_builder", "fused_adam", "cpu_adam")


def is_op_build_failure(error: BaseException) -> bool:
    for e in (error, error.__cause__, error.__context__):
        if e is None:
            continue
        if type(e).__name__ in ("MissingCUDAException", "CalledProcessError", "CUDAMismatchException"):
            return True
        if any(sign in str(e).lower() for sign in _SIGNS):
            return True
    return False


def explain(ds_config: dict, error: BaseException) -> str:
    zero = ds_config.get("zero_optimization") or {}
    offload = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower() == "cpu"
    op = "DeepSpeedCPUAdam (offload_optimizer)" if offload else "FusedAdam"
    fix = ('set "torch_adam": true in the optimizer "params" of the DeepSpeed config (torch\'s AdamW, nothing to '
           'compile)')
    if offload:
        fix += ' together with "zero_force_ds_cpu_optimizer": false at the top level (slower host steps)'
    return (f"DeepSpeed could not build {op}, which it compiles on first use ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}). Either {fix}, or give it a "
            "compiler: a C++ compiler and ninja (pip install ninja), and for GPU ops the CUDA toolkit matching "
            "torch with CUDA_HOME set (or a DeepSpeed wheel pre-built with DS_BUILD_FUSED_ADAM=1 / "
            "DS_BUILD_CPU_ADAM=1)")


@contextmanager
def explained_op_build_failures(ds_config: dict):
    try:
        yield
    except Exception as e:
        if not is_op_build_failure(e):
            raise
        raise RuntimeError(explain(ds_config, e)) from e
