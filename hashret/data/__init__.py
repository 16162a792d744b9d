"""Datasets, splits and featurizers: one :class:`CrossModalDataset` shape for every source."""

from hashret.data.dataset import MODALITIES, CrossModalDataset, Split, random_split
from hashret.data.featurize import BagOfWords, pixels_to_features
from hashret.data.sources import data_roots, dataset_names, load_dataset, read_mat
from hashret.data.synthetic import attach_synthetic_image, make_synthetic

__all__ = ["MODALITIES", "CrossModalDataset", "Split", "random_split", "BagOfWords",
           "pixels_to_features", "data_roots", "dataset_names", "load_dataset", "read_mat",
           "attach_synthetic_image", "make_synthetic"]
