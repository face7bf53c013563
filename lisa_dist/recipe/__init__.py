"""The recipe: `lisa-train` and what it needs (run config, model building, data, presets, lisa-train's
checkpoint directories, the planner, reporting, plots, export). It owns the command line; the
backends below it take typed arguments only."""
