"""`segqc refine`: HERMES on files. Reads an image and (optionally) a segmentation, refines the
slices the QC model flags with a prompt-based segmenter, writes the new mask (and a JSON trace).

The command-line wiring (typer options) lives in :mod:`SegQCLib.cli`; this module holds the work so
that the Slicer Logic and scripts can call it without typer.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .loop import DEFAULT_MAX_ITERATIONS, RefineResult
from .prompts import STRATEGIES
from .segmenters import SEGMENTERS


def _check_outputs(out: Path, json_out: Path | None, inputs: tuple[Path, ...]) -> None:
    """Fail before any work on an unusable output path (missing folder, an input file, out == json)."""
    from ..io import check_output_path

    check_output_path(out, inputs)
    if json_out is not None:
        check_output_path(json_out, inputs)
        if Path(json_out).resolve() == Path(out).resolve():
            raise InputError(json_out, "the JSON trace and the refined mask would be the same file")


def refine_command(image: Path, seg: Path | None, out: Path, *, segmenter: str = "grabcut",
                   checkpoint: Path | None = None, threshold: float = 0.8, model: str = "atlas-brain-mr",
                   label: str | None = None, name: str | None = None, json_out: Path | None = None,
                   device: str = "auto", max_iterations: int = DEFAULT_MAX_ITERATIONS,
                   only_flagged: bool = True, strategy: str | None = None) -> RefineResult:
    """HERMES on files: read, refine, write ``out`` (bool mask as a 0/1 uint8 label file on the image grid).

    Args:
        image: 3D image file (NIfTI, NRRD, MHA or a DICOM folder).
        seg: segmentation to correct (label map, binary mask or ``.seg.nrrd``), or None to segment
            from scratch (every slice where the pGT holds the structure, starting from the
            segmenter's initial prompts, e.g. a box over the whole slice).
        out: where the refined mask is written (only the refined structure, values 0/1); never an input.
        segmenter: ``grabcut``, ``randomwalker`` or ``medsam`` (needs ``checkpoint``).
        checkpoint: local MedSAM (SAM ViT-B) state dict for ``medsam``.
        threshold: pseudo-DSC under which a slice is flagged and refined, and at which the loop stops.
        model: registered QC model that gives a pGT (e.g. ``atlas-brain-mr``).
        label: structure in ``seg`` (value or name); without ``seg`` it names the structure.
        name: structure name handed to the QC model, overriding the segment's name.
        json_out: where the JSON trace (per slice: prompts, pseudo-DSC per iteration) is written.
        device: ``auto``, ``cpu`` or ``cuda`` for the QC model and MedSAM.
        max_iterations: refinement iterations per slice at most (the paper: 20).
        only_flagged: refine only flagged slices (False: every slice with mask or pGT).
        strategy: prompt strategy (``box``, ``scribbles``, ``clicks``); None: the segmenter's own
            (GrabCut and MedSAM ``box``, random walker ``scribbles``). MedSAM reads boxes only.

    Returns:
        The :class:`~SegQCLib.refine.loop.RefineResult` (refined mask, traces, the QC result).

    Raises:
        InputError: bad paths, unknown segmenter/model/label, a model without pGT, a bad checkpoint;
        raised before any long work where possible.
    """
    from ..io import align_to_grid, binary_mask, read_segmentation, read_volume, write_bytes_atomic, write_mask
    from ..qc import available_models, json_value, load_model, resolve_device
    from .loop import refine_volume
    from .segmenters import segmenter_from_name

    image, out = Path(image), Path(out)
    seg = Path(seg) if seg is not None else None
    json_out = Path(json_out) if json_out is not None else None
    inputs = tuple(p for p in (image, seg) if p is not None)
    _check_outputs(out, json_out, inputs)
    if segmenter not in SEGMENTERS:
        raise InputError("--segmenter", f"unknown segmenter {segmenter!r} (choose {', '.join(SEGMENTERS)})")
    if segmenter == "medsam" and checkpoint is None:
        raise InputError("--checkpoint", "the medsam segmenter needs a local checkpoint (medsam_vit_b.pth)")
    if not 0.0 < threshold <= 1.0:
        raise InputError("--threshold", f"must be in (0, 1], got {threshold}")
    if strategy is not None and strategy not in STRATEGIES:
        raise InputError("--strategy", f"unknown prompt strategy {strategy!r} (choose {', '.join(STRATEGIES)})")
    if max_iterations < 1:
        raise InputError("--max-iterations", f"must be at least 1, got {max_iterations}")
    entry = {e.name: e for e in available_models()}.get(model)
    if entry is None:
        load_model(model)  # raises the InputError listing the installed models
    elif entry.kind != "reconstruction":
        raise InputError("--model", f"model {model} gives no pseudo ground truth (kind {entry.kind}); "
                                    "HERMES needs a reconstruction model such as atlas-brain-mr")
    resolved = resolve_device(device)

    volume = read_volume(image)
    if seg is not None:
        segmentation = align_to_grid(read_segmentation(seg), volume.grid)
        mask, segment = binary_mask(segmentation, label)
        structure = name or segment.name
    else:
        mask = None
        structure = name or label
        if not structure:
            raise InputError("--name", "without a segmentation, name the structure to segment (--name or --label)")
    prompt_segmenter = segmenter_from_name(segmenter, checkpoint, resolved)
    qc_model = load_model(model, resolved)
    result = refine_volume(volume, mask, structure, qc_model, prompt_segmenter, threshold=threshold,
                           only_flagged=only_flagged, max_iterations=max_iterations, strategy=strategy)
    write_mask(result.mask, volume.grid, out, inputs)
    if json_out is not None:
        data = {"image": str(image), "segmentation": str(seg) if seg else None, "output": str(out),
                "segmenter": segmenter, "strategy": strategy or prompt_segmenter.strategy, **result.to_json_dict()}
        write_bytes_atomic(json_out, json.dumps(json_value(data), indent=2))
    return result
