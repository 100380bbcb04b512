"""HERMES: QC-then-refine. Prompt strategies, segmenter adapters and the refinement loop."""
from .loop import RefineResult, SliceTrace, refine_slice, refine_volume
from .prompts import Prompts
from .segmenters import SEGMENTERS, segmenter_from_name

__all__ = ["Prompts", "RefineResult", "SEGMENTERS", "SliceTrace", "refine_slice", "refine_volume", "segmenter_from_name"]
