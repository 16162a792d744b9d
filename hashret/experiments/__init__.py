"""Experiments above training: the mAP benchmark runner, the cascade's evaluation and the
report writers (tables, curves, plots). Used by the CLI and ``benchmarks/``."""
