"""Experiments: datasets, TOML configs, the evaluation of policies, reports and plots,
and the wiring that builds cascade levels from a config."""
