"""SegQC Review: the QC panel beside Slicer's Segment Editor, in a browser (``segqc review``).

A trame-slicer app: three slice views, trame-slicer's Segment Editor, and the SegQC panel, all on
the same MRML scene and through the same :mod:`SegQCLogic` as the desktop module. It serves one
review per server process on 127.0.0.1 unless told otherwise (``--host``).
"""
