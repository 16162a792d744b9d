"""Losses shared by the hash models, written once."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf


def pairwise_nll(theta: torch.Tensor, s: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Negative log-likelihood of pairwise similarities: -sum(S * theta - log(1 + e^theta)),
    theta_ij = <h_i, h_j> / 2. Written with softplus, so it is finite for any |theta| (the
    naive log(1 + exp(theta)) overflows to inf at theta ~ 89 in float32)."""
    loss = nnf.softplus(theta) - s * theta
    return loss.sum() if reduction == "sum" else loss.mean()


def label_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """S_ij = 1 when items i and j share at least one label."""
    return (a @ b.T > 0).to(a.dtype)
