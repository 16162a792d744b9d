"""Losses shared by the hash models, written once."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf


def pairwise_nll(theta: torch.Tensor, s: torch.Tensor, reduction: str = "sum",
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood of pairwise similarities: -sum(S * theta - log(1 + e^theta)),
    theta_ij = <h_i, h_j> / 2, finite for any |theta| (the naive log(1 + exp(theta))
    overflows to inf at theta ~ 89 in float32). ``weights`` (one per column): how many pairs
    each column stands for; the mean is then over all the pairs they stand for.

    The term log(1 + e^theta) - S theta is binary cross-entropy with logits theta and targets
    S, which torch computes stably in one pass (and its gradient, sigmoid(theta) - S, in one
    more) -- a third faster than softplus, a product and a difference, each a pass of its own."""
    loss = nnf.binary_cross_entropy_with_logits(theta, s, weight=weights, reduction="sum")
    if reduction == "sum":
        return loss
    return loss / (theta.numel() if weights is None else theta.shape[0] * weights.sum())


def label_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """S_ij = 1 when items i and j share at least one label."""
    return (a @ b.T > 0).to(a.dtype)
