"""Batch QC at dataset scale: every case and structure of a dataset, resumable, local or on Dask.

``run_batch(INPUT, model, OUT)`` scores every (case, structure) of an MSD / nnU-Net folder, a CSV
of pairs or a Slicer ``.mrb`` scene and appends one row per structure to ``OUT/results.csv`` as
each case finishes. The file is the run's journal:

- the rows of one case are appended with a single ``write`` on a file opened ``O_APPEND`` and then
  fsync'ed, each row carrying ``case_rows`` (how many rows its case has), so a case is finished
  exactly when all its rows are in the file;
- on (re)start the journal is repaired: a torn last line and the rows of a case that is not
  complete are dropped (atomic rewrite), and finished cases are skipped. A crash, a ``kill -9`` or
  Ctrl-C therefore loses no finished case and never duplicates one.

True metrics compare a segmentation with its reference structure by structure, matched by name
through each file's label table (:func:`select_structures`): a value meaning another structure in
the other file is never compared, and a structure the reference lacks has no true metrics (blank).

Only the driver process writes the journal; workers return rows. With ``workers=0`` cases run in
this process; otherwise on a Dask cluster: a ``LocalCluster`` of ``workers`` single-threaded worker
processes (default: one per core) with a memory limit each, or an existing cluster at
``scheduler``. A worker that dies has its case rescheduled by Dask (up to
``distributed.scheduler.allowed-failures`` times; then the case gets an error row). Memory per
worker stays bounded because a worker holds one case at a time and models score slices in batches
(Quality Sentinel: 10 slices per volume).
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data.cases import Case, read_dataset
from .errors import InputError, SegQCError
from .io import Segment, Segmentation
from .qc import DEFAULT_FLAG_THRESHOLD

#: Columns of ``results.csv`` (a public contract: the report and users' scripts read them). New
#: columns are only ever appended, so a journal written by an earlier version (a prefix of these
#: columns) is resumed: see :class:`ResultJournal`.
RESULT_COLUMNS = (
    "case_id", "structure", "label_value", "method", "model", "pred_dsc", "pred_hd95", "n_slices",
    "n_flagged", "worst_slice", "worst_slice_dsc", "threshold", "true_dsc", "true_hd95", "image",
    "segmentation", "reference", "pgt", "runtime_s", "status", "error", "worker", "case_rows",
    # calibrated interval of the predicted DSC / HD95 (mm) and its nominal coverage (0-1); blank when
    # the model has no calibration. domain: "in" / "out" (of the calibration data's kind of case)
    "pred_dsc_lo", "pred_dsc_hi", "pred_hd95_lo", "pred_hd95_hi", "interval_coverage", "domain",
    "note",  # short human text: why a row has no true metrics, when the model never saw the structure
    "slice_axis",  # array axis (0, 1, 2 of (z, y, x)) that worst_slice indexes: the one closest to superior-inferior
)
RESULTS_FILE = "results.csv"
_FLOAT_COLUMNS = ("pred_dsc", "pred_hd95", "worst_slice_dsc", "threshold", "true_dsc", "true_hd95", "runtime_s",
                  "pred_dsc_lo", "pred_dsc_hi", "pred_hd95_lo", "pred_hd95_hi", "interval_coverage")
_INT_COLUMNS = ("label_value", "n_slices", "n_flagged", "worst_slice", "case_rows", "slice_axis")
#: A journal needs the columns up to ``case_rows`` to tell which cases finished (see ResultJournal).
_JOURNAL_KEY_COLUMNS = RESULT_COLUMNS.index("case_rows") + 1


# --------------------------------------------------------------------------- inputs
def load_cases(source: str | Path, work_dir: str | Path) -> list[Case]:
    """Cases of a dataset folder, a CSV of pairs or a ``.mrb`` scene (unpacked under ``work_dir/scene``)."""
    source = Path(source)
    if not source.exists():
        raise InputError(source, "no such file or folder")
    if source.suffix.lower() == ".mrb":
        from .data.scenes import mrb_cases

        return mrb_cases(source, Path(work_dir) / "scene")
    return read_dataset(source)


def case_key(case_id: str, method: str, model: str) -> tuple[str, str, str]:
    """What identifies a finished case in the journal."""
    return (str(case_id), str(method or ""), str(model))


@dataclass(frozen=True)
class Structure:
    """A structure to score in one case: its name and its segment in each file.

    ``segment``: in the segmentation; None when the segmentation does not hold the structure (it is
    then scored as an empty mask: a segmenter that found nothing). ``reference``: in the reference;
    None when there is no reference or it does not hold the structure (no true metrics).
    ``notes``: short texts for the row's ``note`` column.
    """

    name: str
    segment: Segment | None = None
    reference: Segment | None = None
    notes: tuple[str, ...] = ()

    @property
    def value(self) -> int:
        """Label value of the row: the reference's when it holds the structure (the truth's
        numbering), else the segmentation's, else -1."""
        segment = self.reference or self.segment
        return int(segment.value) if segment is not None else -1

    def matches(self, text: str) -> bool:
        """Whether ``text`` (a name, case-insensitive, or a label value in either file) is this structure."""
        text = str(text).strip()
        if self.name.lower() == text.lower():
            return True
        return text.isdigit() and int(text) in {s.value for s in (self.segment, self.reference) if s is not None}


def _binary(seg: Segmentation) -> bool:
    """An unnamed file with at most one label value: a mask of one structure, whatever its value."""
    return not seg.named and len(seg.segments) <= 1


def _by_name(seg: Segmentation | None, name: str) -> Segment | None:
    if seg is None or not seg.named:
        return None
    return next((s for s in seg.segments if s.name.lower() == name.lower()), None)


def _by_value(seg: Segmentation | None, value: int | None) -> Segment | None:
    return next((s for s in seg.segments if s.value == value), None) if seg is not None else None


def _find(seg: Segmentation | None, label: str) -> Segment | None:
    """``Segmentation.find`` (name, then value) for a named file; None when absent."""
    if seg is None or not seg.named:
        return None
    try:
        return seg.find(label)
    except InputError:
        return None


def _segment_of(seg: Segmentation | None, name: str, label: str | None, other: Segmentation | None) -> Segment | None:
    """The segment of structure ``name`` in ``seg`` (one file of a case; ``other`` is the other file).

    A named file is searched by name only, so that a value meaning another structure there is never
    used. An unnamed binary mask is the structure itself (an empty one gives an empty segment). An
    unnamed label map falls back to values: the value the other file's table gives the name, else
    the row's ``label`` when it is a value.
    """
    if seg is None:
        return None
    if seg.named:
        return _by_name(seg, name)
    if _binary(seg):
        return seg.segments[0] if seg.segments else Segment(name, 1)
    named_in_other = _by_name(other, name)
    if named_in_other is not None:
        return _by_value(seg, named_in_other.value)
    return _by_value(seg, int(label)) if label is not None and label.strip().isdigit() else None


def _value_notes(seg: Segmentation, reference: Segmentation | None) -> tuple[str, ...]:
    """Say when an unnamed label map was matched to the other file's table by value."""
    if reference is None or seg.named == reference.named:
        return ()
    unnamed, what, other = (seg, "segmentation", "reference") if not seg.named else (reference, "reference",
                                                                                      "segmentation")
    return () if _binary(unnamed) else (f"{what} has no label table: its values read as the {other}'s",)


def _all_names(seg: Segmentation, reference: Segmentation | None) -> list[tuple[str, str | None]]:
    """(name, value as text or None) of every structure of a case without a ``label`` (see
    :func:`select_structures`); the value is what :func:`_segment_of` uses in an unnamed label map."""
    if reference is None:  # one row per name (segments are found by name), the first segment of a name
        unique: dict[str, tuple[str, str]] = {}
        for s in seg.segments:
            unique.setdefault(s.name.lower(), (s.name, str(s.value)))
        return list(unique.values())
    files = [seg, reference]
    if all(f.named for f in files):  # one table each: the names are the key
        names = {s.name.lower(): s.name for f in files for s in f.segments}
        return [(name, None) for name in names.values()]
    if not any(f.named for f in files) and not all(_binary(f) for f in files):  # no table at all: values
        return [(str(v), str(v)) for v in sorted({s.value for f in files for s in f.segments})]
    binary = next((f for f in files if _binary(f)), None)
    if binary is not None:  # a mask and a file of one structure: paired as `segqc metrics` pairs them
        other = reference if binary is seg else seg
        if len(other.segments) > 1:
            raise InputError(binary.name, f"is a mask without a label table and {other.name} holds "
                                          f"{len(other.segments)} structures: name its structure in the "
                                          "CSV's label column")
        name = other.segments[0].name if other.segments else (binary.segments[0].name if binary.segments else "1")
        return [(name, None)]
    named = seg if seg.named else reference  # one unnamed label map: the named file's names for its values
    values = sorted({s.value for f in files for s in f.segments})
    return [(_by_value(named, v).name if _by_value(named, v) else str(v), str(v)) for v in values]


def select_structures(seg: Segmentation, reference: Segmentation | None, case_label: str | None,
                      wanted: Sequence[str] | None) -> list[Structure]:
    """The structures of a case, each with its segment in the segmentation and in the reference.

    Structures are matched by NAME through the files' label tables, so a value that means different
    structures in the two files is never compared. Names come from each file's table; an unnamed
    binary mask is the structure the case's ``label`` names (or the reference's only structure);
    where a file has no table at all, values stand for names (both unnamed: plain values; one
    unnamed label map: the other file's names for its values, with a note).

    With a case ``label`` (a CSV row's structure, a name or value, resolved the way
    :meth:`Segmentation.find` does, in the segmentation first) the case has exactly that one
    structure. Otherwise every structure of either file: one the segmentation lacks is scored as an
    empty mask, one the reference lacks has no truth. ``wanted`` (names or values) narrows the list.

    Raises :class:`InputError` for an unnamed binary mask without a ``label`` whose named reference
    holds several structures (which one the mask is cannot be told).
    """
    notes = _value_notes(seg, reference)
    if case_label:
        label = str(case_label).strip()
        found = _find(seg, label) or _find(reference, label)
        pairs = [(found.name if found is not None else label, label)]
    else:
        pairs = _all_names(seg, reference)
    structures = [Structure(name, _segment_of(seg, name, label, reference), _segment_of(reference, name, label, seg),
                            notes) for name, label in pairs]
    structures.sort(key=lambda s: s.value)
    if wanted:
        structures = [s for s in structures if any(s.matches(w) for w in wanted)]
    return structures


# --------------------------------------------------------------------------- work of one case
_MODELS: dict[tuple[str, str], Any] = {}


def _model(name: str, device: str):
    """The QC model, built once per process (a Dask worker keeps it across cases)."""
    from .qc import load_model

    key = (name, device)
    if key not in _MODELS:
        _MODELS[key] = load_model(name, device)
    return _MODELS[key]


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return f"local-{os.getpid()}"


def _error_rows(case: Case, model: str, message: str, worker: str = "") -> list[dict[str, Any]]:
    row = _empty_row(case, model)
    row.update(status="error", error=message, worker=worker or _worker_name(), case_rows=1)
    return [row]


def _empty_row(case: Case, model: str) -> dict[str, Any]:
    return {
        "case_id": case.case_id, "structure": "", "label_value": -1, "method": case.method or "", "model": model,
        "pred_dsc": math.nan, "pred_hd95": math.nan, "n_slices": 0, "n_flagged": 0, "worst_slice": -1,
        "worst_slice_dsc": math.nan, "threshold": math.nan, "true_dsc": math.nan, "true_hd95": math.nan,
        "image": str(case.image), "segmentation": str(case.segmentation),
        "reference": str(case.reference) if case.reference else "", "pgt": "", "runtime_s": 0.0,
        "status": "ok", "error": "", "worker": "", "case_rows": 1,
        "pred_dsc_lo": math.nan, "pred_dsc_hi": math.nan, "pred_hd95_lo": math.nan, "pred_hd95_hi": math.nan,
        "interval_coverage": math.nan, "domain": "", "note": "", "slice_axis": -1,
    }


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def assess_case(case: Case, model: str, device: str = "cpu", threshold: float = DEFAULT_FLAG_THRESHOLD,
                structures: Sequence[str] | None = None, pgt_dir: str | None = None) -> list[dict[str, Any]]:
    """Score every selected structure of one case; one row per structure (``RESULT_COLUMNS``).

    Bad input of this case (unreadable file, mismatched geometry, unknown label, ...) gives one
    ``status="error"`` row naming the file and the problem instead of stopping the batch.
    Runs in a Dask worker or in the calling process.
    """
    from .fingerprint import slice_axis
    from .io import write_mask
    from .metrics import dice, hd95

    worker = _worker_name()
    try:
        image, seg = case.load()
        reference = case.load_reference(image.grid)
        chosen = select_structures(seg, reference, case.label, structures)
        qc_model = _model(model, device)
        rows = []
        for structure in chosen:
            start = time.perf_counter()
            mask = _structure_mask(seg, structure.segment)
            truth = _structure_mask(reference, structure.reference) if structure.reference is not None else None
            if not mask.any() and (truth is None or not truth.any()):
                continue  # listed in a label table but present nowhere: nothing to score
            result = qc_model.assess(image, mask, structure.name, threshold=threshold, all_slices=False)
            row = _empty_row(case, model)
            worst = result.worst_slices(1)
            row.update(
                structure=structure.name, label_value=structure.value, pred_dsc=result.volume.get("dsc", math.nan),
                pred_hd95=result.volume.get("hd95", math.nan), n_slices=len(result.slices),
                n_flagged=len(result.flagged), worst_slice=worst[0]["index"] if worst else -1,
                worst_slice_dsc=worst[0].get("dsc", math.nan) if worst else math.nan, threshold=threshold,
                worker=worker, **_interval_columns(result),
                note="; ".join(_notes(structure, reference, result, empty=not mask.any())),
                slice_axis=int(result.extra.get("slice_axis", slice_axis(image.grid))),
            )
            if truth is not None:
                row.update(true_dsc=dice(mask, truth), true_hd95=hd95(mask, truth, image.spacing))
            if result.pgt is not None and pgt_dir:
                file = Path(pgt_dir) / _safe_name(f"{case.case_id}_{case.method or ''}_{structure.name}_pgt.nii.gz")
                inputs = [case.image, case.segmentation] + ([case.reference] if case.reference else [])
                row["pgt"] = str(write_mask(result.pgt, image.grid, file, inputs))
            row["runtime_s"] = time.perf_counter() - start
            rows.append(row)
        if not rows:
            return _error_rows(case, model, f"{case.segmentation}: no structure to score "
                                            f"(selected: {', '.join(structures) if structures else 'all'})", worker)
        for row in rows:
            row["case_rows"] = len(rows)
        return rows
    except SegQCError as err:
        return _error_rows(case, model, str(err), worker)


def _structure_mask(seg: Segmentation, segment: Segment | None) -> np.ndarray:
    """(z, y, x) bool mask of ``segment`` in ``seg``; all False when the file does not hold it."""
    if segment is None:
        return np.zeros(seg.layers.shape[1:], bool)
    return seg.layers[segment.layer] == segment.value


def _interval_columns(result) -> dict[str, Any]:
    """The calibrated-interval columns of a row from a QC result (NaN / blank without calibration)."""
    interval = result.extra.get("interval") or {}
    columns = {f"pred_{key}": result.volume.get(key, math.nan) for key in ("dsc_lo", "dsc_hi", "hd95_lo", "hd95_hi")}
    return dict(columns, interval_coverage=interval.get("coverage", math.nan), domain=interval.get("domain", ""))


def _notes(structure: Structure, reference: Segmentation | None, result, empty: bool) -> list[str]:
    """The row's notes: an empty mask, why there are no true metrics, matching by value, a structure
    new to the model. ``empty``: the segmentation's mask of the structure has no voxel."""
    notes = list(structure.notes)
    if empty:  # the file lacks the structure or its mask is blank: scored as a segmenter that found nothing
        notes.append("empty segmentation: the segmenter found nothing")
    if reference is not None and structure.reference is None:
        notes.append("structure not in the reference: no true metrics")
    if result.extra.get("structure_seen_in_training") is False:
        nearest = result.extra.get("nearest_trained_structure")
        notes.append("model not trained on this structure" + (f" (read as {nearest})" if nearest else ""))
    # why the input is outside the model's domain (SegQCLib.domain: modality, intensity, spacing, structure)
    said = result.extra.get("structure_seen_in_training") is False  # the structure's reason is said above
    reasons = [r for r in (result.extra.get("domain") or {}).get("reasons", []) if not (said and r.startswith("structure '"))]
    if reasons:
        notes.append("outside the model's domain: " + "; ".join(reasons))
    return notes


# --------------------------------------------------------------------------- the journal
def _format(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else ("inf" if math.isinf(value) else repr(float(value)))
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    return str(value)


def _rows_to_csv(rows: Iterable[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in rows:
        writer.writerow([_format(row.get(c, "")) for c in RESULT_COLUMNS])
    return buffer.getvalue()


class ResultJournal:
    """``results.csv``: rows appended per finished case, repaired and deduplicated on open."""

    def __init__(self, path: str | Path, retry_errors: bool = False):
        self.path = Path(path)
        self.rows: list[dict[str, str]] = []
        self._repair(retry_errors)

    def _repair(self, retry_errors: bool) -> None:
        """Keep complete cases only (and drop error rows when retrying), rewriting the file if needed."""
        if not self.path.exists():
            self._rewrite([])
            return
        text = self.path.read_text()
        complete_text = text[: text.rfind("\n") + 1]  # a torn last line (crash mid-write) is dropped
        reader = csv.DictReader(io.StringIO(complete_text))
        header = tuple(reader.fieldnames or ())
        # an earlier version's journal has a prefix of today's columns (columns are only appended):
        # resumable when it has at least the columns that tell finished cases apart
        earlier = len(header) >= _JOURNAL_KEY_COLUMNS and header == RESULT_COLUMNS[: len(header)]
        if reader.fieldnames is not None and not earlier:
            raise InputError(self.path, "exists but is not a SegQC results journal (its columns are not those "
                                        "of results.csv; move it away or choose another --out)")
        # rows with too many or too few cells are damaged: dropped, so their case runs again
        rows = [dict.fromkeys(RESULT_COLUMNS, "") | r for r in reader if None not in r and None not in r.values()]
        by_case: dict[tuple[str, str, str], list[dict[str, str]]] = {}
        for row in rows:
            by_case.setdefault(case_key(row["case_id"], row["method"], row["model"]), []).append(row)
        kept = []
        for case_rows in by_case.values():
            expected = int(case_rows[0]["case_rows"] or 0)
            if len(case_rows) != expected or len({r["case_rows"] for r in case_rows}) != 1:
                continue  # torn case: its rows were not all written; it runs again
            if retry_errors and any(r["status"] == "error" for r in case_rows):
                continue
            kept.extend(case_rows)
        if len(kept) != len(rows) or complete_text != text or header != RESULT_COLUMNS:
            self._rewrite(kept)  # atomic: an old header is replaced by today's, old rows get blank new cells
        self.rows = kept

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        from .io import write_bytes_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.path, ",".join(RESULT_COLUMNS) + "\n" + _rows_to_csv(rows), fsync=True)

    def finished(self) -> set[tuple[str, str, str]]:
        """Keys (case_id, method, model) of the cases whose rows are all in the journal."""
        return {case_key(r["case_id"], r["method"], r["model"]) for r in self.rows}

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append the rows of one case with one write, then fsync (see the module docstring)."""
        data = _rows_to_csv(rows).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            written = os.write(fd, data)
            if written != len(data):  # regular files write fully; anything else is a disk problem
                raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows.extend({c: _format(r.get(c, "")) for c in RESULT_COLUMNS} for r in rows)


def read_results(path: str | Path):
    """``results.csv`` as a pandas DataFrame with numeric columns typed (NaN for blanks).

    A file of an earlier version lacks the columns appended since: they come back blank (NaN)."""
    import pandas as pd

    from .report import parse_floats

    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in RESULT_COLUMNS:
        if column not in table:
            table[column] = ""
    for column in _FLOAT_COLUMNS:
        table[column] = parse_floats(table[column])
    for column in _INT_COLUMNS:
        table[column] = parse_floats(table[column]).fillna(-1).astype(int)
    return table


# --------------------------------------------------------------------------- the run
@dataclass
class BatchSummary:
    """What a run did: cases in the input, skipped as already finished, run now, and failed."""

    out_dir: Path
    total: int
    skipped: int
    done: int = 0
    errors: int = 0
    skipped_ok: int = 0  # of the skipped cases, those whose rows are not errors
    interrupted: bool = False
    seconds: float = 0.0
    workers: int = 0
    results: Path = field(default_factory=Path)

    @property
    def all_failed(self) -> bool:
        """Every case run now failed and no case of the input finished well before: nothing was scored."""
        return 0 < self.done == self.errors and self.skipped_ok == 0


ProgressCallback = Callable[[int, int, str], None]


def run_batch(source: str | Path, model: str, out_dir: str | Path, *, device: str = "cpu",
              threshold: float = DEFAULT_FLAG_THRESHOLD, structures: Sequence[str] | None = None,
              limit: int | None = None, workers: int | None = None, scheduler: str | None = None,
              memory_limit: str = "auto", retry_errors: bool = False, write_pgt: bool = True,
              progress: ProgressCallback | None = None) -> BatchSummary:
    """Score every case of ``source`` with the QC model ``model``; rows go to ``out_dir/results.csv``.

    Args:
        source: MSD / nnU-Net folder, CSV of pairs, or ``.mrb`` scene.
        model: registered QC model name (``segqc models``).
        device: ``cpu``, ``cuda`` or ``auto`` for the workers.
        structures: only these structures (names or label values); default all.
        limit: only the first ``limit`` cases of the input (in input order).
        workers: Dask worker processes of a LocalCluster (default: the core count); 0 runs in this
            process without Dask.
        scheduler: address of an existing Dask scheduler (``tcp://host:8786``); ``workers`` is then ignored.
        memory_limit: memory limit per LocalCluster worker (Dask syntax, ``"auto"`` = RAM / workers).
        retry_errors: run again the cases whose earlier rows were errors.
        progress: called as ``progress(finished_now, to_run, case_id)`` after each case.

    Ctrl-C stops the run after closing the cluster; every finished case is already in the journal.
    """
    from .qc import available_models, resolve_device

    out = Path(out_dir)
    source = Path(source)
    if out.resolve() == source.resolve():
        raise InputError(out, "is the input dataset: choose another --out folder")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder: choose another --out folder")
    device = resolve_device(device)
    installed = [entry.name for entry in available_models()]
    if model not in installed:  # fail fast, before any cluster starts (the driver never loads the model)
        raise InputError(model, f"unknown QC model (installed: {', '.join(installed) or 'none'})")
    cases = load_cases(source, out)  # reads nothing but the listing; bad input fails before OUT is made
    out.mkdir(parents=True, exist_ok=True)
    if limit is not None:
        cases = cases[: max(limit, 0)]
    journal = ResultJournal(out / RESULTS_FILE, retry_errors)
    finished = journal.finished()
    todo = [c for c in cases if case_key(c.case_id, c.method or "", model) not in finished]
    ok_before = finished - {case_key(r["case_id"], r["method"], r["model"]) for r in journal.rows if r["status"] == "error"}
    summary = BatchSummary(out, total=len(cases), skipped=len(cases) - len(todo), results=journal.path,
                           skipped_ok=sum(case_key(c.case_id, c.method or "", model) in ok_before for c in cases))
    pgt_dir = str(out / "pgt") if write_pgt else None
    if pgt_dir:
        Path(pgt_dir).mkdir(exist_ok=True)
    args = dict(model=model, device=device, threshold=threshold, structures=list(structures or []) or None,
                pgt_dir=pgt_dir)
    start = time.perf_counter()

    def record(rows: list[dict[str, Any]], case_id: str) -> None:
        journal.append(rows)
        summary.done += 1
        summary.errors += any(r["status"] == "error" for r in rows)
        if progress:
            progress(summary.done, len(todo), case_id)

    try:
        if todo and workers == 0 and scheduler is None:
            summary.workers = 0
            for case in todo:
                record(assess_case(case, **args), case.case_id)
        elif todo:
            _run_on_dask(todo, args, record, summary, workers, scheduler, memory_limit)
    except KeyboardInterrupt:
        summary.interrupted = True
    summary.seconds = time.perf_counter() - start
    return summary


def _run_on_dask(todo: list[Case], args: dict[str, Any], record: Callable[[list[dict[str, Any]], str], None],
                 summary: BatchSummary, workers: int | None, scheduler: str | None, memory_limit: str) -> None:
    """Submit one task per case; record rows in the driver as tasks complete (any order)."""
    from distributed import Client, LocalCluster, as_completed
    from distributed.client import FutureCancelledError

    cluster = None
    if scheduler is None:
        n_workers = workers or os.cpu_count() or 1
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               memory_limit=memory_limit, dashboard_address=None)
    client = Client(scheduler or cluster)
    summary.workers = len(client.scheduler_info().get("workers", {}))
    futures, case_of = [], {}
    try:
        for i, case in enumerate(todo):
            future = client.submit(assess_case, case, **args, key=f"segqc-case-{i}-{_safe_name(case.case_id)}",
                                   pure=False)
            futures.append(future)
            case_of[future.key] = case
        for future in as_completed(futures):
            case = case_of[future.key]
            try:
                rows = future.result()
            except FutureCancelledError:
                continue
            except Exception as err:  # KilledWorker after repeated worker deaths, or a bug in a model
                rows = _error_rows(case, args["model"], f"{case.segmentation}: {type(err).__name__}: {err}")
            record(rows, case.case_id)
    finally:
        client.cancel(futures)
        client.close()
        if cluster is not None:
            cluster.close()
