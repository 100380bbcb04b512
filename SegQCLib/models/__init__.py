"""QC models, one module per method. Importing this package registers the installed models."""
