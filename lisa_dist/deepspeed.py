"""Public entry point of the DeepSpeed backend (lisa_dist/backends/deepspeed/):

    engine, optimizer, _, scheduler = lisa_dist.deepspeed.initialize(model=model, config=ds_config, lisa=LisaConfig())

Lazy like the package it re-exports: DeepSpeed is imported at first use, not here."""
from lisa_dist.backends.deepspeed import __all__, __getattr__  # noqa: F401
