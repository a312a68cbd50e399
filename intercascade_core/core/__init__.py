"""The pure core: calibration, the strategy repository, retrieval, the cascade machine.

Modules here import only the standard library, numpy, scipy, tqdm (progress bars), each other and
:mod:`intercascade_core.errors` (checked by import-linter). They do no I/O: models,
embedders and external search backends come in through :mod:`.protocols`.
"""
