"""SegQC: quality control of medical image segmentations without ground truth.

Pure Python (NumPy, SimpleITK, torch/MONAI where a model runs); never imports slicer, qt or ctk.
"""
__version__ = "0.1.0"
