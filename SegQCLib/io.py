"""Reading and writing images and segmentations, label tables, and input checks.

Readers: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``),
Slicer segmentations (``.seg.nrrd``, segment names kept) and DICOM series (a folder). Writers:
NIfTI and ``.seg.nrrd``. Every write goes to a temporary file beside the target and is renamed into
place, so a failure never leaves a half-written file; writers refuse to replace an input file.

Label names come from, in this order: the ``.seg.nrrd`` header, a table passed by the caller, or a
sidecar text table next to the file (``aal.nii.txt`` for ``aal.nii.gz``: lines ``value name ...``).
"""
from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .volume import Grid, Volume, check_finite

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")


# --------------------------------------------------------------------------- segmentations
@dataclass(frozen=True)
class Segment:
    """One structure of a segmentation: voxels equal to ``value`` in layer ``layer``."""

    name: str
    value: int
    layer: int = 0
    color: tuple[float, float, float] | None = None


@dataclass
class Segmentation:
    """Label maps on one grid and the structures they hold.

    ``layers`` is (L, z, y, x) integer (L = 1 for an ordinary label map; Slicer segmentations with
    overlapping segments have several layers). Segments list every structure in the file, also
    those whose mask is empty.
    """

    layers: np.ndarray
    grid: Grid
    segments: list[Segment]
    name: str = ""
    named: bool = True  # False when names were made up from label values (no label table)

    @classmethod
    def from_labelmap(cls, labelmap: np.ndarray, grid: Grid, names: Mapping[int, str] | None = None,
                      name: str = "") -> "Segmentation":
        """Wrap a (z, y, x) integer label map; ``names`` maps values to structure names."""
        labelmap = _as_label_array(labelmap, name)
        values = [int(v) for v in np.unique(labelmap) if v != 0]
        if names:
            segments = [Segment(str(n), int(v)) for v, n in sorted(names.items()) if int(v) != 0]
            known = {s.value for s in segments}
            unnamed = [v for v in values if v not in known]
            if unnamed:
                raise InputError(name, f"label values {unnamed[:10]} are not in its label table")
        else:
            segments = [Segment(str(v), v) for v in values]
        return cls(labelmap[None], grid, segments, name, named=bool(names))

    @property
    def labelmap(self) -> np.ndarray:
        """The (z, y, x) label map of a single-layer segmentation."""
        if self.layers.shape[0] != 1:
            raise InputError(self.name, "has overlapping segments in several layers; select one segment")
        return self.layers[0]

    def find(self, label: str | int | None) -> Segment:
        """The segment named or valued ``label`` (case-insensitive name, or an integer value).

        ``None`` picks the only segment; with several, the error lists them.
        """
        if label is None:
            if len(self.segments) == 1:
                return self.segments[0]
            if not self.segments:
                raise InputError(self.name, "segmentation is empty: it has no labelled voxels")
            raise InputError(self.name, f"has {len(self.segments)} labels ({self.describe_labels()}); "
                                        "choose one with --label")
        text = str(label).strip()
        for seg in self.segments:
            if seg.name.lower() == text.lower():
                return seg
        if re.fullmatch(r"\d+", text):
            for seg in self.segments:
                if seg.value == int(text):
                    return seg
        raise InputError(self.name, f"unknown label {text!r} (labels: {self.describe_labels()})")

    def describe_labels(self, limit: int = 12) -> str:
        items = [f"{s.value}={s.name}" if s.name != str(s.value) else str(s.value) for s in self.segments]
        more = f", ... {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    def mask(self, label: str | int | None = None) -> np.ndarray:
        """Binary (z, y, x) bool mask of the structure ``label`` (see :meth:`find`)."""
        seg = self.find(label)
        return self.layers[seg.layer] == seg.value

    def masks(self, labels: Iterable[str | int] | None = None) -> dict[str, np.ndarray]:
        """Per-label binary masks, name -> (z, y, x) bool, for ``labels`` or all segments."""
        segs = self.segments if labels is None else [self.find(l) for l in labels]
        return {s.name: self.layers[s.layer] == s.value for s in segs}


def _as_label_array(array: np.ndarray, source: str) -> np.ndarray:
    """Check a label array is integer-valued and non-negative; return it with an integer dtype."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(source, "segmentation contains NaN or infinite values")
        if not np.array_equal(array, np.round(array)):
            raise InputError(source, "segmentation has non-integer values: not a label map or binary mask")
        array = array.astype(np.int32)
    elif not np.issubdtype(array.dtype, np.integer):
        raise InputError(source, f"segmentation has unsupported voxel type {array.dtype}")
    if array.size and array.min() < 0:
        raise InputError(source, "segmentation has negative label values")
    return array


def binary_mask(seg: Segmentation, label: str | int | None = None) -> tuple[np.ndarray, Segment]:
    """The bool mask of one structure and its segment. An unnamed single label is taken as the mask.

    An unnamed file without any labelled voxel is an empty binary mask (a segmenter that found
    nothing): an all-False mask and a segment named ``""`` (no name: the caller names it), valued
    ``label`` when that is a value, else 1.

    Raises :class:`InputError` for an unknown label, or when ``label`` is None and the file holds
    several labels (a non-binary mask).
    """
    if not seg.named and not seg.segments and (label is None or str(label).strip().isdigit()):
        value = int(str(label).strip()) if label is not None else 1
        return np.zeros(seg.layers.shape[1:], bool), Segment("", value)
    seg_info = seg.find(label)
    return seg.layers[seg_info.layer] == seg_info.value, seg_info


# --------------------------------------------------------------------------- label tables
def read_label_table(path: str | Path) -> dict[int, str]:
    """Read a text label table: lines ``value name [...]`` (AAL/MRIcron ``.txt``) or ITK-SNAP/Slicer
    colour tables (``value name r g b a``, ``#`` comments). Returns value -> name."""
    path = Path(path)
    table: dict[int, str] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as err:
        raise InputError(path, f"cannot read label table ({err.strerror})") from None
    for line in lines:
        parts = line.strip().split()
        if not parts or parts[0].startswith("#") or not re.fullmatch(r"\d+", parts[0]) or len(parts) < 2:
            continue
        name = parts[1].strip('"')
        if int(parts[0]) != 0:
            table[int(parts[0])] = name
    if not table:
        raise InputError(path, "no 'value name' lines found: not a label table")
    return table


def _strip_image_suffix(filename: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def sidecar_label_table(path: str | Path) -> Path | None:
    """The text label table next to an image file, if any (``aal.nii.gz`` -> ``aal.nii.txt``)."""
    path = Path(path)
    stem = _strip_image_suffix(path.name)
    for candidate in (f"{stem}.nii.txt", f"{stem}.txt", f"{stem}.ctbl"):
        if (path.parent / candidate).is_file():
            return path.parent / candidate
    return None


# --------------------------------------------------------------------------- reading
def _read_sitk(path: str | Path) -> sitk.Image:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        return _read_dicom_series(path)
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""
        raise InputError(path, f"cannot read: corrupt or unsupported image file ({detail})") from None
    if path.name.lower().endswith((".nii", ".nii.gz")) and image.GetDimension() == 3 \
            and image.GetNumberOfComponentsPerPixel() == 1:
        image = _with_nifti_voxels(image, path)
    return image


def _with_nifti_voxels(image: sitk.Image, path: Path) -> sitk.Image:
    """Re-read a NIfTI file's voxels with nibabel, keeping ITK's geometry.

    ITK's NIfTI reader silently zero-fills a truncated ``.nii.gz`` and turns NaN voxels into 0, so
    it would hide exactly the corrupt inputs SegQC must report; nibabel raises on the first and
    keeps the second. Geometry (qform/sform choice, LPS direction) stays ITK's.
    """
    import nibabel

    try:
        data = np.asanyarray(nibabel.load(str(path)).dataobj)
    except Exception as err:  # nibabel raises several types (EOFError, zlib.error, ImageFileError, ...)
        raise InputError(path, f"cannot read: corrupt image file ({str(err).strip()[:200]})") from None
    data = np.ascontiguousarray(data.T)  # (x, y, z[, t]) -> (z, y, x)
    if data.shape != sitk.GetArrayViewFromImage(image).shape:
        raise InputError(path, f"cannot read: voxel array {data.shape} does not match its header")
    fixed = sitk.GetImageFromArray(data.astype(sitk.GetArrayViewFromImage(image).dtype, copy=False)
                                   if not np.issubdtype(data.dtype, np.floating) else data)
    fixed.CopyInformation(image)
    return fixed


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(folder, "folder holds no DICOM series")
    if len(series) > 1:
        raise InputError(folder, f"folder holds {len(series)} DICOM series; give the folder of one series")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise InputError(folder, f"cannot read DICOM series ({str(err).strip()[:200]})") from None


def _grid_of(image: sitk.Image) -> Grid:
    return Grid(image.GetSize()[::-1], image.GetSpacing()[::-1], image.GetOrigin(), image.GetDirection())


def _check_3d(image: sitk.Image, path: str | Path) -> None:
    if image.GetDimension() == 2:
        raise InputError(path, f"is a 2D image ({image.GetSize()[0]}x{image.GetSize()[1]}); a 3D volume is needed")
    if image.GetDimension() != 3:
        raise InputError(path, f"is a {image.GetDimension()}D image; a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel (4D or "
                               "vector image); a single 3D volume is needed")


def read_volume(path: str | Path) -> Volume:
    """Read a 3D image (NIfTI, NRRD, MHA or a DICOM series folder) as float32, checked for NaNs."""
    image = _read_sitk(path)
    _check_3d(image, path)
    array = sitk.GetArrayFromImage(image)
    volume = Volume(array.astype(np.float32, copy=False), _grid_of(image), str(path))
    check_finite(volume)
    return volume


def read_segmentation(path: str | Path, label_table: Mapping[int, str] | str | Path | None = None) -> Segmentation:
    """Read a label map or binary mask, or a Slicer ``.seg.nrrd`` (segment names and layers kept).

    ``label_table`` maps values to names (or is a path to a text table); without it a sidecar table
    next to the file is used when present.
    """
    path = Path(path)
    image = _read_sitk(path)
    keys = set(image.GetMetaDataKeys()) if hasattr(image, "GetMetaDataKeys") else set()
    if "Segment0_LabelValue" in keys or "Segment0_Name" in keys:
        return _segmentation_from_slicer(image, path)
    _check_3d(image, path)
    if isinstance(label_table, (str, Path)):
        label_table = read_label_table(label_table)
    elif label_table is None:
        sidecar = sidecar_label_table(path)
        label_table = read_label_table(sidecar) if sidecar else None
    labelmap = sitk.GetArrayFromImage(image)
    return Segmentation.from_labelmap(labelmap, _grid_of(image), label_table, name=str(path))


def _segmentation_from_slicer(image: sitk.Image, path: Path) -> Segmentation:
    """A ``.seg.nrrd``: 3D (one layer) or 4D stored as a vector image (one component per layer)."""
    if image.GetDimension() != 3:
        raise InputError(path, f"is a {image.GetDimension()}D segmentation; a 3D one is needed")
    array = sitk.GetArrayFromImage(image)
    layers = array[None] if image.GetNumberOfComponentsPerPixel() == 1 else np.moveaxis(array, -1, 0)
    layers = _as_label_array(layers, str(path))
    segments = []
    i = 0
    while image.HasMetaDataKey(f"Segment{i}_ID") or image.HasMetaDataKey(f"Segment{i}_Name"):
        meta = lambda key, default="": (image.GetMetaData(f"Segment{i}_{key}")  # noqa: E731
                                        if image.HasMetaDataKey(f"Segment{i}_{key}") else default)
        color = tuple(float(c) for c in meta("Color", "").split()) or None
        segments.append(Segment(meta("Name", meta("ID", f"Segment_{i}")), int(meta("LabelValue", "1")),
                                int(meta("Layer", "0")), color if color and len(color) == 3 else None))
        i += 1
    return Segmentation(layers, _grid_of(image), segments, str(path), named=True)


def align_to_grid(seg: Segmentation, grid: Grid) -> Segmentation:
    """Put ``seg`` on ``grid`` when it lies on the same voxel lattice (Slicer crops ``.seg.nrrd``
    files to the segments' extent): an exact pad/crop, no interpolation. Any other difference is an
    :class:`InputError` naming the segmentation file."""
    if seg.grid.same_as(grid):
        return seg
    same_axes = (np.allclose(seg.grid.spacing, grid.spacing, atol=1e-3)
                 and np.allclose(seg.grid.direction, grid.direction, atol=1e-4))
    if same_axes:
        offset_ijk = np.linalg.solve(grid.direction_matrix * np.asarray(grid.spacing_xyz),
                                     np.asarray(seg.grid.origin) - np.asarray(grid.origin))
        offset = offset_ijk[::-1]  # (z, y, x)
        if np.allclose(offset, np.round(offset), atol=1e-3):
            return _shift_layers(seg, grid, np.round(offset).astype(int))
    from .volume import check_same_grid

    check_same_grid(grid, seg.grid, "the image", seg.name)  # raises with the differences listed
    return seg


def _shift_layers(seg: Segmentation, grid: Grid, offset: np.ndarray) -> Segmentation:
    out = np.zeros((seg.layers.shape[0], *grid.shape), dtype=seg.layers.dtype)
    src, dst = [], []
    for o, n_src, n_dst in zip(offset, seg.layers.shape[1:], grid.shape):
        lo, hi = max(o, 0), min(o + n_src, n_dst)
        dst.append(slice(lo, max(hi, lo)))
        src.append(slice(lo - o, max(hi, lo) - o))
    cut = seg.layers[(slice(None), *src)]
    kept = int(np.count_nonzero(cut))
    if kept != int(np.count_nonzero(seg.layers)):
        raise InputError(seg.name, "segmentation extends outside the image; geometry does not match")
    out[(slice(None), *dst)] = cut
    return Segmentation(out, grid, list(seg.segments), seg.name, seg.named)


# --------------------------------------------------------------------------- writing
def check_output_path(path: str | Path, inputs: Iterable[str | Path] = ()) -> None:
    """Raise :class:`InputError` when ``path`` would overwrite one of ``inputs`` or its folder is missing."""
    path = Path(path)
    for source in inputs:
        if source and Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise InputError(path, "output would overwrite an input file; choose another output path")
    if not path.parent.exists():
        raise InputError(path, f"output folder {path.parent} does not exist")


@contextmanager
def atomic_output(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto ``path`` when the block succeeds and removed
    when it fails, so a reader never sees a half-written file. The file gets the usual permissions
    (0666 less the umask), not the 0600 of :func:`tempfile.mkstemp`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: str | bytes, fsync: bool = False) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically (see :func:`atomic_output`)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
    return path


def _atomic_write(image: sitk.Image, path: Path, compress: bool = True) -> None:
    """Write next to ``path`` then rename, so a failed write leaves nothing behind."""
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    with atomic_output(path, suffix) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def _to_sitk(array: np.ndarray, grid: Grid, is_vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.SetSpacing(grid.spacing_xyz)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


def write_volume(volume: Volume, path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Write a Volume as NIfTI/NRRD/MHA (by suffix), atomically; refuses to overwrite ``inputs``."""
    path = Path(path)
    check_output_path(path, inputs)
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    _atomic_write(_to_sitk(array, volume.grid), path)
    return path


def write_mask(mask: np.ndarray, grid: Grid, path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Write a bool/label (z, y, x) array on ``grid`` as an 8/16-bit label file."""
    mask = np.asarray(mask)
    dtype = np.uint8 if mask.max(initial=0) < 256 else np.uint16
    return write_volume(Volume(mask.astype(dtype), grid), path, inputs)


def write_segmentation(seg: Segmentation, path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Write a Slicer ``.seg.nrrd`` (segment names, values, layers and colours in the header).

    Any other suffix writes the label map (single layer) as a plain image plus, when named, a
    sidecar ``.txt`` label table.
    """
    path = Path(path)
    check_output_path(path, inputs)
    if not path.name.lower().endswith(".seg.nrrd"):
        _atomic_write(_to_sitk(seg.labelmap.astype(np.uint16 if seg.labelmap.max(initial=0) > 255 else np.uint8),
                               seg.grid), path)
        if seg.named:
            sidecar = path.parent / (_strip_image_suffix(path.name) + ".txt")
            sidecar.write_text("".join(f"{s.value} {s.name}\n" for s in seg.segments))
        return path
    layers = seg.layers.astype(np.uint8 if seg.layers.max(initial=0) < 256 else np.uint16)
    image = _to_sitk(layers[0], seg.grid) if len(layers) == 1 else _to_sitk(np.moveaxis(layers, 0, -1), seg.grid, True)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    extent = " ".join(f"0 {n - 1}" for n in seg.grid.shape[::-1])
    for i, s in enumerate(seg.segments):
        color = s.color or _default_color(i)
        for key, value in (("ID", f"Segment_{i + 1}"), ("Name", s.name), ("NameAutoGenerated", "0"),
                           ("Color", " ".join(f"{c:.6g}" for c in color)), ("ColorAutoGenerated", "0"),
                           ("LabelValue", str(s.value)), ("Layer", str(s.layer)), ("Extent", extent),
                           ("Tags", "Segmentation.Status:inprogress|")):
            image.SetMetaData(f"Segment{i}_{key}", value)
    _atomic_write(image, path)
    return path


def _default_color(i: int) -> tuple[float, float, float]:
    palette = ((0.5, 0.68, 0.5), (0.95, 0.84, 0.57), (0.69, 0.48, 0.39), (0.44, 0.5, 0.82),
               (0.85, 0.4, 0.4), (0.56, 0.78, 0.9), (0.9, 0.7, 0.85), (0.6, 0.6, 0.3))
    return palette[i % len(palette)]
