"""Evaluation: the protocol's metrics, curves and plots, and the mAP benchmark."""

from hashret.eval.metrics import (MAP_AT_K_MODES, evaluate_codes, hamming_distances, map_all,
                                  map_at_k, relevance)

__all__ = ["MAP_AT_K_MODES", "evaluate_codes", "hamming_distances", "map_all", "map_at_k",
           "relevance"]
