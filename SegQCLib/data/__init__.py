"""Datasets and sample data: MSD / nnU-Net / CSV readers, real labelled MRI sources, slice sampling."""
from .cases import Case, dataset_modality, normalise_modality, read_dataset
from .slices import evenly_spaced_slices, foreground_slices
from .sources import LabelledSubject, available_sources, colin27, mni152

__all__ = [
    "Case", "read_dataset", "dataset_modality", "normalise_modality",
    "LabelledSubject", "colin27", "mni152", "available_sources",
    "evenly_spaced_slices", "foreground_slices",
]
