"""SegQC's MRML Logic: one implementation for every front end (desktop module, Segment Editor effect, web app).

It imports MRML (``slicer``, ``vtk``) and :mod:`SegQCLib`, never Qt, so it runs in the Slicer
application, headless on the ``slicer-core`` wheel (the pytest suite) and in the trame-slicer web
app (``segqc review``) alike. Long work is split into :class:`SegQCJob` objects whose numerical
part runs in a worker thread on NumPy arrays only (MRML is not thread-safe).

Geometry conventions: numpy arrays are indexed ``[k, j, i]`` = ``[z, y, x]`` (as
``slicer.util.arrayFromVolume`` returns them); ``SegQCLib`` uses ITK's LPS physical space, MRML uses
RAS, and the Logic converts between the two (flip the sign of the first two axes).
"""
from .job import SegQCJob, _Cancelled
from .logic import (
    ATTRIBUTE_PREFIX,
    CHART_REFERENCE_ROLE,
    METRIC_COLUMNS,
    PIP_REQUIREMENTS,
    REFERENCE_MODEL,
    SEGMENTATION_REFERENCE_ROLE,
    VOLUME_REFERENCE_ROLE,
    SegQCLogic,
)

__all__ = ["ATTRIBUTE_PREFIX", "CHART_REFERENCE_ROLE", "METRIC_COLUMNS", "PIP_REQUIREMENTS", "REFERENCE_MODEL",
           "SEGMENTATION_REFERENCE_ROLE", "VOLUME_REFERENCE_ROLE", "SegQCJob", "SegQCLogic", "_Cancelled"]
