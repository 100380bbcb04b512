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
from .qc import DEFAULT_FLAG_THRESHOLD

#: Columns of ``results.csv`` (a public contract: the report and users' scripts read them).
RESULT_COLUMNS = (
    "case_id", "structure", "label_value", "method", "model", "pred_dsc", "pred_hd95", "n_slices",
    "n_flagged", "worst_slice", "worst_slice_dsc", "threshold", "true_dsc", "true_hd95", "image",
    "segmentation", "reference", "pgt", "runtime_s", "status", "error", "worker", "case_rows",
)
RESULTS_FILE = "results.csv"
_FLOAT_COLUMNS = ("pred_dsc", "pred_hd95", "worst_slice_dsc", "threshold", "true_dsc", "true_hd95", "runtime_s")
_INT_COLUMNS = ("label_value", "n_slices", "n_flagged", "worst_slice", "case_rows")


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
    """A structure to score in one case: its name and label value in the segmentation file."""

    name: str
    value: int


def select_structures(seg_segments: Sequence[Any], ref_segments: Sequence[Any] | None, case_label: str | None,
                      wanted: Sequence[str] | None) -> list[Structure]:
    """The structures of a case: those of the segmentation (and of the reference, so a structure the
    segmentation missed is scored too), narrowed to the case's own ``label`` and to ``wanted`` (names,
    case-insensitive, or label values)."""
    found: dict[int, Structure] = {}
    for segment in list(seg_segments) + list(ref_segments or []):
        found.setdefault(int(segment.value), Structure(segment.name, int(segment.value)))
    structures = sorted(found.values(), key=lambda s: s.value)

    def matches(structure: Structure, text: str) -> bool:
        text = str(text).strip()
        return structure.name.lower() == text.lower() or (text.isdigit() and int(text) == structure.value)

    if case_label:
        structures = [s for s in structures if matches(s, case_label)]
    if wanted:
        structures = [s for s in structures if any(matches(s, w) for w in wanted)]
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
    from .io import align_to_grid, read_segmentation, read_volume, write_mask
    from .metrics import dice, hd95

    worker = _worker_name()
    try:
        image = read_volume(case.image)
        seg = align_to_grid(read_segmentation(case.segmentation, case.label_table), image.grid)
        reference = None
        if case.reference is not None:
            reference = align_to_grid(read_segmentation(case.reference, case.label_table), image.grid)
        chosen = select_structures(seg.segments, reference.segments if reference else None, case.label, structures)
        qc_model = _model(model, device)
        rows = []
        for structure in chosen:
            start = time.perf_counter()
            mask = _structure_mask(seg, structure)
            truth = _structure_mask(reference, structure) if reference is not None else None
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
                worker=worker,
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


def _structure_mask(seg, structure: Structure) -> np.ndarray:
    for segment in seg.segments:
        if segment.value == structure.value:
            return seg.layers[segment.layer] == segment.value
    return np.zeros(seg.layers.shape[1:], bool)


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
        if reader.fieldnames is not None and tuple(reader.fieldnames) != RESULT_COLUMNS:
            raise InputError(self.path, "exists but is not a SegQC results journal with the current columns "
                                        "(move it away or choose another --out)")
        rows = [r for r in reader if None not in r and all(c in r for c in RESULT_COLUMNS)]
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
        if len(kept) != len(rows) or complete_text != text or reader.fieldnames is None:
            self._rewrite(kept)
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
    """``results.csv`` as a pandas DataFrame with numeric columns typed (NaN for blanks)."""
    import pandas as pd

    from .report import parse_floats

    table = pd.read_csv(path, dtype=str, keep_default_na=False)
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
    interrupted: bool = False
    seconds: float = 0.0
    workers: int = 0
    results: Path = field(default_factory=Path)


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
    summary = BatchSummary(out, total=len(cases), skipped=len(cases) - len(todo), results=journal.path)
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
