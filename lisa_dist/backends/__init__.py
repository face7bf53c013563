"""Backends: how LISA trains on one engine. Each keeps the semantics of the core (lisa_dist/) and
owns its engine's private APIs behind one adapter per library.

- single.py: one process, LisaOptimizer (the numerical reference);
- ddp.py: DDP's gradient reduction for the active layers only (used by the HF integration);
- deepspeed/: the ZeRO-1/2/3 engine hook, its runner, checkpoints and ZeRO-3 loading;
- fsdp/: per-layer fully_shard units, FSDPLisaOptimizer, its runner and DCP checkpoints;
- torch_compat.py: every private torch access (FSDP2's mixed-precision init, DDP's ignored params).
"""
