"""Training and evaluation loops shared by the QC models."""
