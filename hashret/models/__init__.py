"""Hash models, built by name through one factory.

``build_model("dcmh-mlp", bits=64, image_dim=..., text_dim=..., n_labels=...)``; a name may
carry its code length (``"cca-itq-32"``). :func:`build_for_dataset` takes the input sizes
from a dataset. Checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint`.
"""

from __future__ import annotations

from hashret.errors import HashretError, check
from hashret.models import baselines, gch  # noqa: F401  (registers the models)
from hashret.models.base import REGISTRY, HashModel
from hashret.models.checkpoint import load_checkpoint, save_checkpoint


def model_names() -> list:
    return sorted(REGISTRY)


def parse_model_name(name: str):
    """'gch-64' -> ('gch', 64); 'cca-itq' -> ('cca-itq', None)."""
    check(isinstance(name, str) and name.strip(), "no model name given: use one of "
          + ", ".join(model_names()))
    name = name.strip().lower()
    if name in REGISTRY:
        return name, None
    base, _, tail = name.rpartition("-")
    if base in REGISTRY and tail.isdigit():
        return base, int(tail)
    raise HashretError(f"unknown model {name!r}: use one of {', '.join(model_names())} "
                       "(optionally with '-BITS', e.g. cca-itq-32)")


def build_model(name: str, bits: int | None = None, image_dim: int = 0, text_dim: int = 0,
                n_labels: int = 0, seed: int = 0, **overrides) -> HashModel:
    base, named_bits = parse_model_name(name)
    if named_bits is not None and bits is not None:
        check(named_bits == bits, f"model {name} has {named_bits} bits but {bits} were asked for")
    bits = bits if bits is not None else named_bits
    check(bits is not None, f"no code length for {name}: pass bits or a name like {base}-64")
    return REGISTRY[base](bits, image_dim, text_dim, n_labels, seed=seed, **overrides)


def build_for_dataset(name: str, dataset, bits: int | None = None, seed: int = 0,
                      **overrides) -> HashModel:
    return build_model(name, bits, image_dim=dataset.dim("image"), text_dim=dataset.dim("text"),
                       n_labels=dataset.n_labels, seed=seed, **overrides)


__all__ = ["HashModel", "build_model", "build_for_dataset", "model_names", "parse_model_name",
           "save_checkpoint", "load_checkpoint"]
