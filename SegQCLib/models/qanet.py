"""QANet: predicts the SEG of a microscopy instance segmentation from the image and the segmentation.

Network (QANet, Aharoni et al., eq. 1-3): a **RibCage** of four blocks. The image rib and the
segmentation rib each process their input alone, ``R^l = f(conv(R^{l-1}))``; the spine fuses both at
every block, ``S^l = f(conv(S^{l-1}) ⊕ conv(R_IM^{l-1}) ⊕ conv(R_SEG^{l-1}))`` (⊕ concatenation,
f = BatchNorm + ReLU, S^0 = 0, so block 1's spine has no spine branch). Blocks are separated by 2x
max pooling. The last block's spine and ribs are globally average-pooled, concatenated and passed to
fully connected layers 128-128-k with a sigmoid: predicted SEG (and optional extra [0, 1] targets)
of the patch. Default rib widths are [32, 64, 128, 256] times ``width``; each spine branch has half
its block's width. 2D and 3D use the same design with 2D/3D convolutions.

Ablations (QANet Table 2): ``fusion="naive"`` (one stream on the concatenated image and
segmentation), ``fusion="siamese"`` (the two ribs alone, fused only before the FC layers); both
are widened to about the RibCage's parameter count (:func:`build_network`). ``encoding="trinary"``
gives the segmentation as two channels (instance interior, instance boundary; background is
neither) from :func:`trinary`; ``encoding="binary"`` as one foreground channel, which loses the
separation between touching instances.

Inputs: the image is scaled by its own percentiles (:func:`normalise_image`); the segmentation is
an instance label image. Images are processed at a *working scale* where nuclei have the
equivalent diameters the model was trained on (:attr:`QANetConfig.diameter_range`), cut into
overlapping patches, batched on the device, and the patch predictions are combined
(:meth:`QANetQC.assess_instances`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.measure import label as connected_regions  # pieces of all ids in one pass (ndi.label: one id at a time)
from skimage.segmentation import watershed
from torch import nn

from ..calibration import Calibration, annotate_scores
from ..errors import InputError
from ..qc import DEFAULT_FLAG_THRESHOLD, QCResult

ARCHITECTURE = "qanet"
FUSIONS = ("ribcage", "naive", "siamese")
ENCODINGS = ("trinary", "binary")
#: Quality targets a head can predict: in [0, 1], SEG of the patch (the paper's patch score), the
#: negative-exponential MHD (tau 10 px) and ``seg_objects``, the mean whole-image SEG score of the
#: patch's nuclei (:mod:`SegQCLib.train.qanet_data`), which does not forgive merges cut by the patch edge;
#: and the boundary distances of :data:`DISTANCE_TARGETS` (QANet Table 1: MHD95, ASD).
TARGETS = ("seg", "nemhd", "seg_objects", "mhd95", "asd")
#: Unbounded targets, distances in px: MHD95 and ASD averaged over the patch's matched instances
#: (:func:`SegQCLib.metrics.instance_metrics`). A second head with a softplus output predicts them, on
#: the working grid; :meth:`QANetQC.assess_instances` reports them in px of the input image.
DISTANCE_TARGETS = ("mhd95", "asd")
#: What a new model learns (``segqc train qanet``); distance heads are trained afterwards on top of a
#: trained model, its network frozen (``segqc train qanet --extend CARD``).
DEFAULT_TARGETS = ("seg", "nemhd", "seg_objects")
#: The head whose instance average is the image score when a model predicts it (else ``seg``).
IMAGE_TARGET = "seg_objects"
#: Calibration domain of a z stack scored slice by slice by a 2D model (its errors differ from a 2D image's).
STACK_DOMAIN = "stack"


# ------------------------------------------------------------------------------------ encodings
def trinary(labels: np.ndarray) -> np.ndarray:
    """Trinary map of an instance label image: 0 background, 1 instance interior, 2 instance boundary.

    labels: (y, x) or (z, y, x) integer instance labels (0 = background). A labelled pixel is on the
    boundary when one of its face neighbours (4-connectivity in 2D, 6 in 3D) inside the array has
    another value (background or another instance), so touching instances stay separated by their
    boundaries. The array border itself is not a boundary (a cell cut by a patch edge is not
    outlined there). Returns uint8, same shape.
    """
    labels = np.asarray(labels)
    out = (labels > 0).astype(np.uint8)
    edge = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        diff = a[1:] != a[:-1]
        e = np.moveaxis(edge, axis, 0)
        e[1:] |= diff
        e[:-1] |= diff
    out[edge & (labels > 0)] = 2
    return out


def encode_segmentation(tri: np.ndarray, encoding: str) -> np.ndarray:
    """Network channels of a trinary map (..., spatial): trinary -> (2, ...) [interior, boundary];
    binary -> (1, ...) [foreground]. float32."""
    tri = np.asarray(tri)
    if encoding == "trinary":
        return np.stack([tri == 1, tri == 2]).astype(np.float32)
    if encoding == "binary":
        return (tri > 0)[None].astype(np.float32)
    raise InputError(None, f"unknown segmentation encoding {encoding!r} (choose {', '.join(ENCODINGS)})")


def encode_batch(tri: torch.Tensor, encoding: str) -> torch.Tensor:
    """Torch version of :func:`encode_segmentation` for a batch (n, *spatial) of trinary maps (uint8)
    -> (n, C, *spatial) float32."""
    if encoding == "trinary":
        return torch.stack([tri == 1, tri == 2], dim=1).float()
    return (tri > 0).unsqueeze(1).float()


def normalise_image(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.8)) -> np.ndarray:
    """Image scaled by its own percentiles: (x - p_lo) / (p_hi - p_lo), clipped to [-1, 2]. float32.

    Background maps near 0 and the brightest nuclei near 1 whatever the camera units; percentiles
    are taken over the whole image (not per patch), so a patch of background stays dark.
    """
    image = np.asarray(image, dtype=np.float32)
    step = max(1, image.size // 500_000)
    lo, hi = np.percentile(image.ravel()[::step], percentiles)
    return np.clip((image - lo) / max(float(hi - lo), 1e-6), -1.0, 2.0).astype(np.float32)


# ------------------------------------------------------------------------------------ config
@dataclass
class QANetConfig:
    """Everything needed to rebuild a QANet and its input pipeline (saved in the model card).

    dims: 2 or 3. fusion: ribcage | naive | siamese. encoding: trinary | binary.
    channels: rib widths per block before ``width`` scaling; fc: hidden FC widths.
    rib_convs: conv units per rib block. patch: patch side in working-grid px.
    targets: predicted quality measures (subset of :data:`TARGETS`, ``"seg"`` first, any
    :data:`DISTANCE_TARGETS` after all the others).
    diameter_range: equivalent diameters (px; 2D area-, 3D volume-equivalent) of the training nuclei
    on the working grid: images whose median instance diameter lies outside are rescaled into it.
    """

    dims: int = 2
    fusion: str = "ribcage"
    encoding: str = "trinary"
    width: float = 0.5
    channels: tuple[int, ...] = (32, 64, 128, 256)
    fc: tuple[int, ...] = (128, 128)
    rib_convs: int = 2
    patch: int = 64
    targets: tuple[str, ...] = ("seg",)
    diameter_range: tuple[float, float] = (10.0, 30.0)

    def __post_init__(self) -> None:
        if self.dims not in (2, 3):
            raise InputError(None, f"dims must be 2 or 3, got {self.dims}")
        if self.fusion not in FUSIONS:
            raise InputError(None, f"unknown fusion {self.fusion!r} (choose {', '.join(FUSIONS)})")
        if self.encoding not in ENCODINGS:
            raise InputError(None, f"unknown encoding {self.encoding!r} (choose {', '.join(ENCODINGS)})")
        bad = [t for t in self.targets if t not in TARGETS]
        distance = [t in DISTANCE_TARGETS for t in self.targets]
        if bad or not self.targets or self.targets[0] != "seg" or distance != sorted(distance):
            raise InputError(None, f"targets must start with 'seg', be among {TARGETS} and end with the distances "
                                   f"{DISTANCE_TARGETS} they hold, got {self.targets}")
        self.channels, self.fc = tuple(self.channels), tuple(self.fc)
        self.targets, self.diameter_range = tuple(self.targets), tuple(self.diameter_range)

    @property
    def seg_channels(self) -> int:
        return 2 if self.encoding == "trinary" else 1

    @property
    def n_bounded(self) -> int:
        """Number of [0, 1] targets (the first ones); the rest are :data:`DISTANCE_TARGETS`."""
        return sum(t not in DISTANCE_TARGETS for t in self.targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QANetConfig":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# ------------------------------------------------------------------------------------ network
def _unit(dims: int, cin: int, cout: int) -> nn.Sequential:
    """conv 3 (no bias) + BatchNorm + ReLU, 2D or 3D."""
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    return nn.Sequential(conv(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True))


def _stream(dims: int, cin: int, widths: Sequence[int], convs: int) -> nn.ModuleList:
    """A rib: one block per width, each ``convs`` units."""
    blocks, c = [], cin
    for w in widths:
        blocks.append(nn.Sequential(*[_unit(dims, c if i == 0 else w, w) for i in range(convs)]))
        c = w
    return nn.ModuleList(blocks)


def _head(features: int, fc: Sequence[int], outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in fc:
        layers += [nn.Linear(features, w), nn.ReLU(inplace=True)]
        features = w
    layers.append(nn.Linear(features, outputs))
    return nn.Sequential(*layers)


class _SpineBlock(nn.Module):
    """S^l = f(conv(S^{l-1}) ⊕ conv(R_IM^{l-1}) ⊕ conv(R_SEG^{l-1})), each branch ``branch`` channels."""

    def __init__(self, dims: int, c_spine: int, c_im: int, c_seg: int, branch: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        self.from_spine = conv(c_spine, branch, 3, padding=1, bias=False) if c_spine else None
        self.from_image = conv(c_im, branch, 3, padding=1, bias=False)
        self.from_seg = conv(c_seg, branch, 3, padding=1, bias=False)
        self.out_channels = branch * (3 if c_spine else 2)
        self.norm = norm(self.out_channels)

    def forward(self, spine: torch.Tensor | None, image: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        parts = [self.from_image(image), self.from_seg(seg)]
        if self.from_spine is not None and spine is not None:
            parts.insert(0, self.from_spine(spine))
        return torch.relu(self.norm(torch.cat(parts, dim=1)))


class RibCageNet(nn.Module):
    """QANet network: (n, 1, *P) image + (n, C_seg, *P) segmentation -> (n, k) qualities: the
    [0, 1] targets from ``head`` (sigmoid), then any distances (px, >= 0) from ``distance_head`` (softplus).

    ``fusion`` selects RibCage (spine fusing both ribs at every block), naive (one stream on the
    concatenated inputs) or siamese (two independent ribs fused before the FC layers). ``stream_mult``
    widens the streams of naive/siamese to match the RibCage's parameter count (see :func:`build_network`).
    """

    def __init__(self, config: QANetConfig, stream_mult: float = 1.0):
        super().__init__()
        self.config = config
        dims = config.dims
        widths = [max(4, int(round(c * config.width * stream_mult))) for c in config.channels]
        self.widths = widths
        self.stream_mult = float(stream_mult)
        self.fusion = config.fusion
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        self.pool = pool(2, ceil_mode=True)
        cs = config.seg_channels
        if config.fusion == "naive":
            self.stream = _stream(dims, 1 + cs, widths, config.rib_convs)
            features = widths[-1]
        else:
            self.rib_image = _stream(dims, 1, widths, config.rib_convs)
            self.rib_seg = _stream(dims, cs, widths, config.rib_convs)
            features = 2 * widths[-1]
            if config.fusion == "ribcage":
                spine, c_spine, c_im, c_seg = [], 0, 1, cs
                for w in widths:
                    block = _SpineBlock(dims, c_spine, c_im, c_seg, max(2, w // 2))
                    spine.append(block)
                    c_spine, c_im, c_seg = block.out_channels, w, w
                self.spine = nn.ModuleList(spine)
                # the last spine block fuses the last ribs' inputs; one more fusion sees their outputs
                self.spine_out = _SpineBlock(dims, c_spine, widths[-1], widths[-1], max(2, widths[-1] // 2))
                features += self.spine_out.out_channels
        self.head = _head(features, config.fc, config.n_bounded)
        n_distances = len(config.targets) - config.n_bounded
        self.distance_head = _head(features, config.fc, n_distances) if n_distances else None

    @staticmethod
    def _gap(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2)

    def features(self, image: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """Pooled last-block features (n, F) fed to the FC head."""
        last = len(self.widths) - 1
        if self.fusion == "naive":
            x = torch.cat([image, seg], dim=1)
            for l, block in enumerate(self.stream):
                x = block(x)
                if l < last:
                    x = self.pool(x)
            return self._gap(x)
        im, sg, sp = image, seg, None
        for l in range(len(self.widths)):
            new_im, new_sg = self.rib_image[l](im), self.rib_seg[l](sg)
            if self.fusion == "ribcage":
                sp = self.spine[l](sp, im, sg)
            im, sg = new_im, new_sg
            if l < last:
                im, sg = self.pool(im), self.pool(sg)
                sp = self.pool(sp) if sp is not None else None
        parts = [self._gap(im), self._gap(sg)]
        if self.fusion == "ribcage":
            parts.append(self._gap(self.spine_out(sp, im, sg)))
        return torch.cat(parts, dim=1)

    def forward(self, image: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        features = self.features(image, seg)
        out = torch.sigmoid(self.head(features))
        if self.distance_head is not None:
            out = torch.cat([out, nn.functional.softplus(self.distance_head(features))], dim=1)
        return out


def count_parameters(net: nn.Module) -> int:
    return int(sum(p.numel() for p in net.parameters()))


def build_network(config: QANetConfig) -> RibCageNet:
    """The network of ``config``; naive and siamese streams are widened so that their parameter
    count is within a few % of the RibCage of the same ``width`` (as in QANet's ablation)."""
    if config.fusion == "ribcage":
        return RibCageNet(config)
    target = count_parameters(RibCageNet(QANetConfig(**{**config.to_dict(), "fusion": "ribcage"})))
    grid = np.round(np.arange(0.8, 4.0, 0.02), 2)  # the count grows with the multiplier: bisect the grid
    lo, hi = 0, len(grid) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_parameters(RibCageNet(config, float(grid[mid]))) < target:
            lo = mid
        else:
            hi = mid
    gaps = {float(grid[i]): abs(count_parameters(RibCageNet(config, float(grid[i]))) - target) for i in (lo, hi)}
    best = min(gaps, key=gaps.get)
    return RibCageNet(config, best)


# ------------------------------------------------------------------------------------ inputs
def _check_inputs(image: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """image float32 and labels int64 of the same 2D/3D shape; InputError naming the problem."""
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim not in (2, 3):
        raise InputError("image", f"must be 2D (y, x) or 3D (z, y, x), got shape {image.shape}")
    if labels.shape != image.shape:
        raise InputError("labels", f"shape {labels.shape} differs from the shape {image.shape} of the image")
    if not np.issubdtype(image.dtype, np.number) or image.dtype == bool:
        raise InputError("image", f"must be numeric, got dtype {image.dtype}")
    image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise InputError("image", "contains NaN or infinite values")
    if labels.dtype == bool:
        labels = ndi.label(labels)[0]
    elif np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise InputError("labels", "must be an integer instance label image, got non-integer values")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise InputError("labels", f"must be an integer instance label image, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise InputError("labels", f"must be non-negative (0 = background), got {labels.min()}")
    return image, labels.astype(np.int64, copy=False)


def _diameter(size: float, ndim: int) -> float:
    """Equivalent diameter (px) of an object of ``size`` pixels: 2D area-, 3D volume-equivalent."""
    return 2.0 * math.sqrt(size / math.pi) if ndim == 2 else (6.0 * size / math.pi) ** (1.0 / 3.0)


def typical_size(labels: np.ndarray) -> float:
    """Size-weighted median instance size (px): the size of the instance holding the median
    foreground pixel. Unlike the plain median over instances, a swarm of tiny false positives
    barely moves it. NaN without instances."""
    counts = np.bincount(labels.ravel())[1:]
    counts = np.sort(counts[counts > 0])
    if counts.size == 0:
        return math.nan
    cumulative = np.cumsum(counts)
    return float(counts[np.searchsorted(cumulative, cumulative[-1] / 2.0)])


def median_diameter(labels: np.ndarray) -> float:
    """Equivalent diameter (px) of the size-weighted median instance (:func:`typical_size`); NaN without instances."""
    size = typical_size(labels)
    return _diameter(size, labels.ndim) if math.isfinite(size) else math.nan


def auto_scale(labels: np.ndarray, diameter_range: tuple[float, float]) -> float:
    """Zoom factor bringing :func:`median_diameter` into ``diameter_range`` (1 when inside or
    without instances); the target is the violated bound moved 10 % inwards, factor clipped to [1/8, 8]."""
    d = median_diameter(labels)
    lo, hi = diameter_range
    if not math.isfinite(d) or lo <= d <= hi:
        return 1.0
    target = lo * 1.1 if d < lo else hi * 0.9
    return float(np.clip(target / d, 0.125, 8.0))


#: Instances smaller than this fraction of :func:`typical_size` do not count in a patch's weight.
COUNT_FRACTION = 0.2


def split_components(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each connected piece of each instance as its own instance, and its share of its instance.

    labels: (y, x) or (z, y, x) integer instance labels. Pieces are connected with full
    connectivity (8 in 2D, 26 in 3D), one instance at a time, so touching instances stay apart.
    Returns ``(pieces, share, owner)``: int32 labels of the same shape, 1..K one per piece (0
    background); ``share`` (K + 1,) float64, each piece's pixels over its instance's (share[0] = 0);
    ``owner`` (K + 1,) int64, the instance id of each piece (owner[0] = 0).

    Why: an instance made of several pieces (one id on two nuclei apart, as a 3D segmentation
    merged through another slice shows in a 2D slice, or a neck lost when zooming) is a merge that
    the trinary map cannot show, since it draws boundaries only where the id changes. SEG scores
    a nucleus matched by such an instance M at most |piece| / |M| (used by :func:`scored_pieces`).
    """
    labels = np.asarray(labels)
    pieces = connected_regions(labels, background=0, connectivity=labels.ndim).astype(np.int32)
    piece_sizes = np.bincount(pieces.ravel())
    owner = np.zeros(piece_sizes.size, np.int64)
    owner[pieces.ravel()] = labels.ravel()
    instance_sizes = np.bincount(labels.ravel()).astype(np.float64)
    share = np.zeros(piece_sizes.size, np.float64)
    share[1:] = piece_sizes[1:] / np.maximum(instance_sizes[owner[1:]], 1.0)
    return pieces, share, owner


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """Labels with every hole given to the instance around it.

    labels: (y, x) or (z, y, x) integer instance labels. A hole is a face-connected background region
    that does not reach the image border and touches (by a face) one instance only; background enclosed
    by two or more instances (a gap between touching nuclei) stays background. Same shape and dtype.

    Why by hand: ``ndi.binary_fill_holes`` fills one mask at a time, so it would fill the gap that
    several instances enclose together; one labelling of the background handles all instances at once.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels
    regions = connected_regions(labels == 0, background=0, connectivity=1)
    n_regions = int(regions.max())
    if n_regions <= 1:
        return labels
    reaches_border = np.zeros(n_regions + 1, bool)
    for axis in range(labels.ndim):
        for index in (0, -1):
            reaches_border[np.take(regions, index, axis=axis).ravel()] = True
    # (background region, instance id) of every face-neighbouring pixel pair, as one int64 key
    n_ids = int(labels.max()) + 1
    keys = []
    for axis in range(labels.ndim):
        r, lab = np.moveaxis(regions, axis, 0), np.moveaxis(labels, axis, 0)
        for r_side, lab_side in ((r[:-1], lab[1:]), (r[1:], lab[:-1])):
            touch = (r_side > 0) & (lab_side > 0)
            keys.append(r_side[touch].astype(np.int64) * n_ids + lab_side[touch].astype(np.int64))
    keys = np.unique(np.concatenate(keys))
    region_of, id_of = keys // n_ids, keys % n_ids
    neighbours = np.bincount(region_of, minlength=n_regions + 1)
    owner = np.zeros(n_regions + 1, np.int64)
    owner[region_of] = id_of
    is_hole = (neighbours == 1) & ~reaches_border
    is_hole[0] = False
    if not is_hole.any():
        return labels
    return np.where(is_hole[regions], owner[regions], labels).astype(labels.dtype)


#: :func:`split_necks`: a neck is narrower than this fraction of the thickest body's width ...
NECK_RATIO = 0.5
#: ... between bodies at least this fraction as thick as the thickest (smaller bumps are not bodies).
BODY_RATIO = 0.7


def split_necks(pieces: np.ndarray, neck_ratio: float = NECK_RATIO,
                body_ratio: float = BODY_RATIO) -> tuple[np.ndarray, np.ndarray]:
    """Each instance cut at its necks into the convex bodies it joins.

    pieces: (y, x) or (z, y, x) integer labels, each id one connected piece (:func:`split_components`);
    distances in pixels of the grid (isotropic). For one piece, ``d`` is its Euclidean distance
    transform and ``peak`` its maximum (the half-width of its thickest body). The cores are the
    connected regions of ``d > neck_ratio * peak``; those whose own maximum reaches
    ``body_ratio * peak`` are bodies. With two or more bodies the piece is cut between them by a
    watershed of ``-d`` seeded with the bodies. Returns ``(parts, parent)``: int32 labels 1..K of the
    same shape (one per body; an uncut piece keeps one part) and ``parent`` (K + 1,) int64, the piece id
    of each part (parent[0] = 0).

    Why: a nucleus is convex, so its distance transform has one ridge top. Threshold methods join
    neighbouring nuclei that kiss at a point through a narrow neck (cells3d: li_cc merges three
    nuclei that way in 3D). The trinary map draws no boundary at the neck, and networks trained on
    simulated merges, whose nuclei overlap broadly, score such an instance as one good nucleus; SEG
    scores each nucleus it holds at most |body| / |instance|. Why by hand: skimage's
    ``peak_local_max`` + watershed is the usual split, but its peaks need an absolute separation and
    height; here the test is relative to each piece's own width, so one rule holds for all sizes.
    """
    pieces = np.asarray(pieces)
    parts = np.zeros(pieces.shape, np.int32)
    parent = [0]
    for piece, box in enumerate(ndi.find_objects(pieces), start=1):
        if box is None:
            continue
        inside = pieces[box] == piece
        # pad so that the distance counts to the crop's edge as to background
        dist = ndi.distance_transform_edt(np.pad(inside, 1))[(slice(1, -1),) * inside.ndim]
        peak = float(dist.max())
        cores, n_cores = ndi.label(dist > neck_ratio * peak)
        bodies = np.zeros(0, np.int64)
        if n_cores > 1:
            tops = np.asarray(ndi.maximum(dist, cores, index=np.arange(1, n_cores + 1)))
            bodies = np.flatnonzero(tops >= body_ratio * peak) + 1
        view = parts[box]
        if bodies.size < 2:
            view[inside] = len(parent)
            parent.append(piece)
            continue
        # full connectivity, as the pieces are connected (split_components): every pixel is reached
        cut = watershed(-dist, markers=np.where(np.isin(cores, bodies), cores, 0), mask=inside,
                        connectivity=inside.ndim)
        for body in bodies:
            view[cut == body] = len(parent)
            parent.append(piece)
    return parts, np.asarray(parent, np.int64)


class ScoredPieces(NamedTuple):
    """What :func:`scored_pieces` returns; arrays indexed by piece id 0..K have K + 1 entries."""
    filled: np.ndarray   #: :func:`fill_holes` of the labels: what the network is shown
    pieces: np.ndarray   #: int32 labels 1..K of the scored pieces
    cover: np.ndarray    #: float64, the labels' pixels in each piece over its filled instance's pixels
    owner: np.ndarray    #: int64, the instance id of each piece
    component: np.ndarray  #: int64, the connected piece of its instance each piece is (or was cut from
                           #: at a neck, :func:`split_necks`), numbered as :func:`split_components`


def scored_pieces(labels: np.ndarray, necks: bool = False) -> ScoredPieces:
    """What the image score averages over: the pieces of the hole-filled instances, and their weights.

    labels: (y, x) or (z, y, x) integer instance labels. ``filled`` = :func:`fill_holes` of ``labels``;
    ``pieces``, ``owner`` as :func:`split_components` of ``filled`` and, with ``necks``, each piece
    further cut at its necks (:func:`split_necks`); ``cover``, the pixels of ``labels`` in each piece
    over the pixels of its filled instance (cover[0] = 0).

    Why: the network sees the trinary map, which draws the boundary of a hole and no boundary between
    pieces under one id, nor at a neck. None of these occurred in training. A piece is therefore scored
    as its own instance on the filled map, and its score is multiplied by the share of the instance's
    outline it covers, as SEG bounds such an instance: two pieces (or bodies) of one id at most
    |piece| / |instance| each; an instance with holes at most its pixels / its filled pixels when the
    nucleus has no hole. One convex piece without holes: cover 1, scored exactly as without this.
    """
    labels = np.asarray(labels)
    filled = fill_holes(labels)
    pieces, _, owner = split_components(filled)
    component = np.arange(owner.size, dtype=np.int64)
    if necks:
        pieces, component = split_necks(pieces)
        owner = owner[component]
    own = np.bincount(pieces[labels > 0], minlength=owner.size).astype(np.float64)
    filled_sizes = np.bincount(filled.ravel()).astype(np.float64)
    cover = np.zeros(owner.size, np.float64)
    cover[1:] = own[1:] / np.maximum(filled_sizes[owner[1:]], 1.0)
    return ScoredPieces(filled, pieces, cover, owner, component)


def distances_to_other_pieces(pieces: np.ndarray, owner: np.ndarray) -> dict[int, tuple[int, np.ndarray]]:
    """For each piece of an instance in two or more pieces (apart, or bodies cut at necks): its share of
    the instance's outline and how far the rest of that outline lies from it.

    pieces: (y, x) or (z, y, x) int labels 1..K (:func:`scored_pieces`); owner: (K + 1,) the instance
    each id belongs to. Distances in px of the grid (isotropic). Returns ``{piece: (n_outline,
    distances)}``: the number of the instance's outline pixels in the piece and, for every outline pixel
    of the instance in its other pieces, the Euclidean distance to the piece. Instances in one piece are
    absent. The outline is the instance's own, so a cut at a neck adds none (the faces where bodies
    meet are inside the instance); for pieces apart it is each piece's outline.

    Why: a nucleus matched by an instance in pieces, or by a merge of it with a neighbour, has in its
    MHD95 and ASD the distances from the rest of the instance's outline to its own; the network sees a
    piece apart as a nucleus of its own, and never saw merges through a narrow neck (the 3D model), so
    it cannot know them (:func:`combine_distances`).
    """
    out: dict[int, tuple[int, np.ndarray]] = {}
    ids = np.arange(owner.size)
    boxes = ndi.find_objects(pieces)
    for instance in np.unique(owner[1:]):
        members = ids[1:][owner[1:] == instance]
        members = members[[boxes[m - 1] is not None for m in members]]
        if members.size < 2:
            continue
        box = tuple(slice(min(boxes[m - 1][a].start for m in members), max(boxes[m - 1][a].stop for m in members))
                    for a in range(pieces.ndim))
        crop = pieces[box]
        inside = np.isin(crop, members)
        outline = inside & ~ndi.binary_erosion(inside)  # the crop is tight: its edge is outline
        for m in members:
            own = crop == m
            # distance to the piece: the EDT of its complement (padded so that the crop edge is no piece)
            distance = ndi.distance_transform_edt(np.pad(~own, 1, constant_values=True))
            distance = distance[(slice(1, -1),) * crop.ndim]
            out[int(m)] = (int(np.count_nonzero(outline & own)), distance[outline & ~own])
    return out


def combine_distances(mhd95: float, asd: float, n_outline: int, other: np.ndarray) -> tuple[float, float]:
    """MHD95 and ASD of a nucleus matched by an instance in pieces, from the network's values for its
    own piece and the distances ``other`` (px) of the other pieces' outline pixels to it.

    The nucleus's and its piece's outlines contribute about ``2 * n_outline`` distances whose mean is
    ``asd`` and whose 95th percentile is ``mhd95``; the other pieces add ``other``. ASD is the mean of
    all; MHD95 is the 95th percentile of all, read from ``other`` when they are more than 5 % of the
    distances (they lie beyond the piece's own), else ``mhd95``. Approximate: the two sets are pooled
    as if the piece's own distances were all at most ``mhd95``.
    """
    n_own, n_other = 2 * max(n_outline, 1), other.size
    if n_other == 0:
        return mhd95, asd
    mean = (n_own * asd + float(other.sum())) / (n_own + n_other)
    share = n_other / (n_own + n_other)
    if share <= 0.05:
        return mhd95, mean
    return max(mhd95, float(np.quantile(other, 1.0 - 0.05 / share))), mean


def _zoom(array: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample to ``shape`` (pixel-centre aligned): order 1 for images, 0 for labels."""
    if tuple(array.shape) == tuple(shape):
        return array
    factors = [n / o for n, o in zip(shape, array.shape)]
    out = ndi.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    # zoom rounds the output shape; force it
    pad = [(0, max(0, n - o)) for n, o in zip(shape, out.shape)]
    out = np.pad(out, pad, mode="edge")
    return out[tuple(slice(0, n) for n in shape)]


def tile_starts(n: int, patch: int, overlap: float) -> list[int]:
    """Start indices of patches of ``patch`` px covering [0, n): stride ``patch * (1 - overlap)``
    (at least 1), the last patch flush with the end. n <= patch -> [0]."""
    if n <= patch:
        return [0]
    stride = max(1, int(round(patch * (1.0 - overlap))))
    starts = list(range(0, n - patch + 1, stride))
    if starts[-1] != n - patch:
        starts.append(n - patch)
    return starts


# ------------------------------------------------------------------------------------ results
@dataclass
class QANetResult:
    """What QANet says about one image's instance segmentation.

    model: model name. image_score: predicted image-level SEG (see :meth:`QANetQC.assess_instances`).
    patches: one row per patch, in input-image px: ``y0, x0`` (and ``z0`` for 3D inputs), ``size``
    (side in input px, rounded), ``seg`` (predicted), ``n_instances`` (instances of the evaluated
    labels in the patch) and any extra predicted targets. heatmap: float32 array of the image's shape,
    each pixel the mean predicted SEG of the patches covering it. scale: working-grid zoom factor.
    """

    model: str
    image_score: float
    patches: list[dict[str, Any]]
    heatmap: np.ndarray
    scale: float = 1.0
    patch_size: int = 64
    runtime_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def patch_scores(self) -> np.ndarray:
        return np.array([row["seg"] for row in self.patches], dtype=np.float64)

    def to_json_dict(self) -> dict[str, Any]:
        """``{"model", "image_score": {"seg": ..., <other heads>: ...}, "instances_in_pieces",
        "instances_with_holes", "instances_cut_at_necks", "patches": [{y0,
        x0(, z0), size, seg, <other heads>, n_instances}], "scale", "patch_size", "runtime_s"}``; non-finite
        numbers become null. ``instances_in_pieces`` counts the instances (in each z slice, for a 2D model
        on a volume) made of two or more evaluated pieces, scored as merges; ``instances_with_holes``
        those with holes, filled for the network and scored by the share they cover (:func:`scored_pieces`);
        ``instances_cut_at_necks`` those cut into bodies at necks, each body scored by its share.
        ``image_score["seg"]`` is the image score (:attr:`image_score`); the other keys are the instance
        averages of the other heads (``seg_objects``, which the image score is made of when present,
        ``nemhd``, and for a model with a distance head ``mhd95`` and ``asd`` in px of the input image,
        not scaled by the pieces' cover; pieces of one id apart and bodies cut at necks add the rest of
        their instance's outline, :func:`combine_distances`). Patch rows hold the same keys, per patch."""
        def num(v: Any) -> Any:
            if isinstance(v, (bool, np.bool_)):
                return bool(v)
            if isinstance(v, (int, np.integer)):
                return int(v)
            if isinstance(v, (float, np.floating)):
                return round(float(v), 6) if math.isfinite(v) else None
            return v

        scores = {"seg": num(self.image_score)}
        scores.update({k: num(v) for k, v in self.extra.get("image_scores", {}).items() if k != "seg"})
        return {"model": self.model, "image_score": scores,
                "instances_in_pieces": int(self.extra.get("instances_in_pieces", 0)),
                "instances_with_holes": int(self.extra.get("instances_with_holes", 0)),
                "instances_cut_at_necks": int(self.extra.get("instances_cut_at_necks", 0)),
                "patches": [{k: num(v) for k, v in row.items()} for row in self.patches],
                "scale": num(self.scale), "patch_size": int(self.patch_size),
                "runtime_s": round(float(self.runtime_s), 4),
                **({"interval": self.extra["interval"]} if "interval" in self.extra else {})}


# ------------------------------------------------------------------------------------ QC model
class QANetQC:
    """A trained QANet: scores instance segmentations patch by patch (kind ``"instance"``)."""

    kind = "instance"

    def __init__(self, name: str, net: RibCageNet, config: QANetConfig, device: str = "cpu",
                 batch_size: int | None = None, card: dict[str, Any] | None = None):
        self.name = name
        self.config = config
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        # channels-last convolutions are about twice as fast on CPU (measured: 0.8 vs 1.5 ms a 64 px patch)
        self._memory_format = (torch.channels_last if config.dims == 2 else torch.channels_last_3d) \
            if self.device.type == "cpu" else torch.contiguous_format
        self.net = self.net.to(memory_format=self._memory_format)
        self.batch_size = batch_size or (64 if config.dims == 2 else 8)
        self.card = card or {}
        self.calibration = Calibration.from_dict(self.card.get("calibration"))

    @torch.no_grad()
    def predict_patches(self, images: np.ndarray, tri: np.ndarray) -> np.ndarray:
        """Predictions (n, k) for normalised image patches (n, *P) float32 and trinary maps (n, *P) uint8."""
        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size])).float()
            s = torch.from_numpy(np.ascontiguousarray(tri[start:start + self.batch_size]))
            x, s = x.unsqueeze(1).to(self.device), encode_batch(s.to(self.device), self.config.encoding)
            x, s = x.contiguous(memory_format=self._memory_format), s.contiguous(memory_format=self._memory_format)
            out.append(self.net(x, s).float().cpu())
        k = len(self.config.targets)
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, k))

    @property
    def necks_by_default(self) -> bool:
        """Whether :meth:`assess_instances` cuts instances at necks when not told: a 3D model's network
        misses merges of kissing nuclei, a 2D model's does not (measurements: ``necks`` below)."""
        return self.config.dims == 3

    def assess_instances(self, image: np.ndarray, labels: np.ndarray, patch: int | None = None, *,
                         overlap: float = 0.5, scale: float | None = None, necks: bool | None = None) -> QANetResult:
        """Predicted SEG of ``labels`` (instance labels) on ``image``, per patch and for the image.

        Args:
            image: (y, x) or (z, y, x) fluorescence image, any units (finite).
            labels: integer instance labels of the same shape (0 = background; a bool mask is split
                into connected components).
            patch: patch side in working-grid px (default: the card's training patch). A 3D model
                needs a 3D input; a 2D model given a 3D input scores every z slice holding instances.
            overlap: fraction of a patch shared with its neighbour (0 <= overlap < 1).
            scale: zoom factor to the working grid; None = :func:`auto_scale` from the labels'
                median instance diameter and the card's ``diameter_range``.
            necks: cut instances at necks into the bodies they join and score each body by its share
                (:func:`split_necks`, :func:`scored_pieces`); None = :attr:`necks_by_default`: on for a
                3D model, off for a 2D one. Measured on held-out simulated scenes
                (``benchmarks/qanet_image_level.py``, r / MAE of the image score, off -> on): 298 3D volumes
                0.871 / 0.110 -> 0.910 / 0.093, 298 3D volumes whose neighbours kiss 0.856 / 0.107 -> 0.920 /
                0.085; 394 2D scenes 0.929 / 0.059 -> 0.925 / 0.061, 59 z stacks 0.963 / 0.059 -> 0.962 / 0.057.

        Returns:
            :class:`QANetResult`. ``image_score`` averages over **instances**, as SEG averages over
            cells, the predictions of the :data:`IMAGE_TARGET` head when the model has one (else
            ``seg``): each evaluated instance (at least :data:`COUNT_FRACTION` of the typical instance
            size, so that specks of false positives do not count) scores the mean prediction of the
            patches holding it, weighted by its pixels in each; the image score is the mean of these,
            an instance weighing max(1, size / typical size), so that a merged instance counts as
            the nuclei it covers. On the working grid, holes in instances are filled before the
            network sees them and an instance in several pieces is scored piece by piece, each
            piece's score times the share of its filled instance it covers (:func:`scored_pieces`),
            as SEG bounds such errors; with ``necks``, pieces are also cut at necks into bodies.
            With no evaluated instance (an empty segmentation), the plain mean of the patch
            predictions; boundary distances are then NaN (null in JSON). A model with distance heads
            also gives ``extra["image_scores"]["mhd95"]`` and ``["asd"]`` (and the same keys in each
            patch row): instance averages in px of the input image, not multiplied by the pieces' cover;
            a piece of an instance in pieces apart, or a body cut at a neck, adds the distances of the
            rest of its instance's outline to it (:func:`combine_distances`). ``n_instances`` in the
            rows counts the evaluated instance pieces in each patch;
            ``extra["image_scores_patch_weighted"]`` holds the older average of patch predictions
            weighted by ``n_instances`` (shipped 2D model on 394 held-out simulated 2D scenes: r 0.914 /
            MAE 0.066, against 0.929 / 0.059 for the instance average; ``benchmarks/qanet_image_level.py``).
        """
        start_time = time.perf_counter()
        image, labels = _check_inputs(image, labels)
        cfg = self.config
        if cfg.dims == 3 and image.ndim == 2:
            raise InputError("image", "this is a 3D QANet model: give a (z, y, x) image")
        if not 0.0 <= overlap < 1.0:
            raise InputError("overlap", f"must be in [0, 1), got {overlap}")
        p = int(patch or cfg.patch)
        if necks is None:
            necks = self.necks_by_default
        if p < 2 ** (len(cfg.channels) - 1):
            raise InputError("patch", f"must be at least {2 ** (len(cfg.channels) - 1)} px, got {p}")
        if scale is None:
            scale = auto_scale(labels, cfg.diameter_range)
        if not (math.isfinite(scale) and scale > 0):
            raise InputError("scale", f"must be positive, got {scale}")
        if cfg.dims == 2 and image.ndim == 3:
            return self._assess_slices(image, labels, p, overlap, scale, start_time, necks)
        rows, heat, preds, instances = self._assess_grid(image, labels, p, overlap, scale, z_index=None, necks=necks)
        return self._result(rows, heat, preds, [instances], scale, p, start_time, "in")

    def _assess_slices(self, image, labels, p, overlap, scale, start_time, necks) -> QANetResult:
        rows, preds, instances, heat = [], [], [], np.full(image.shape, np.nan, np.float32)
        lo_hi = np.percentile(image.ravel()[::max(1, image.size // 500_000)], (1.0, 99.8))
        for z in np.flatnonzero(labels.reshape(len(labels), -1).any(axis=1)):
            r, h, pr, inst = self._assess_grid(image[z], labels[z], p, overlap, scale, z_index=int(z), lo_hi=lo_hi,
                                               necks=necks)
            rows += r
            preds.append(pr)
            instances.append(inst)
            heat[z] = h
        pred = np.concatenate(preds) if preds else np.zeros((0, len(self.config.targets)))
        return self._result(rows, heat, pred, instances, scale, p, start_time, STACK_DOMAIN)

    def _result(self, rows, heat, preds, instances, scale, p, start_time, domain: str) -> QANetResult:
        """Image scores: the mean over instances of each instance's score (the mean prediction of the
        patches holding it, weighted by its pixels in each), an instance weighing max(1, size /
        typical size) — a merged instance counts as the nuclei it covers, as SEG counts them. Without
        counted instances (an empty segmentation), the plain mean of the patch predictions for SEG-like
        heads, and NaN for boundary distances, which are undefined without an outline."""
        inst_scores = np.concatenate([s for s, *_ in instances]) if instances else np.zeros((0, preds.shape[1]))
        inst_weights = np.concatenate([w for _, w, *_ in instances]) if instances else np.zeros(0)
        patch_weights = np.array([row["n_instances"] for row in rows], dtype=np.float64)
        scores, patch_weighted = {}, {}
        for k, target in enumerate(self.config.targets):
            values = preds[:, k] if len(preds) else np.zeros(0)
            if values.size == 0:
                scores[target] = patch_weighted[target] = math.nan
                continue
            patch_weighted[target] = (float(np.average(values, weights=patch_weights)) if patch_weights.sum() > 0
                                      else float(values.mean()))
            if inst_weights.sum() > 0:
                scores[target] = float(np.average(inst_scores[:, k], weights=inst_weights))
            elif target in DISTANCE_TARGETS:  # no instance, no outline: a distance is undefined
                scores[target] = patch_weighted[target] = math.nan
            else:
                scores[target] = float(values.mean())
        headline = scores[IMAGE_TARGET] if IMAGE_TARGET in scores else scores["seg"]
        # intervals: the image level is calibrated on the headline score (JSON image_score.seg) and the
        # distances; patch rows on their own heads
        image_level = {"seg": headline, **{t: scores[t] for t in DISTANCE_TARGETS if t in scores}}
        interval = annotate_scores(image_level, rows, self.calibration, domain, row_level="patch")
        scores.update({k: v for k, v in image_level.items() if k.endswith(("_lo", "_hi"))})
        extra = {"image_scores": scores, "weighting": "instances", "image_scores_patch_weighted": patch_weighted,
                 "instances_in_pieces": sum(inst[2] for inst in instances),
                 "instances_with_holes": sum(inst[3] for inst in instances),
                 "instances_cut_at_necks": sum(inst[4] for inst in instances)}
        if interval is not None:
            extra["interval"] = interval
        return QANetResult(self.name, headline, rows, heat, float(scale), p, time.perf_counter() - start_time,
                           extra=extra)

    def _assess_grid(self, image: np.ndarray, labels: np.ndarray, p: int, overlap: float, scale: float,
                     z_index: int | None, lo_hi: Sequence[float] | None = None, necks: bool = False):
        """Patches of one 2D or 3D grid: rows (input px), heat map (input shape), predictions (n, k)."""
        ndim = image.ndim
        if lo_hi is None:
            normalised = normalise_image(image)
        else:
            lo, hi = lo_hi
            normalised = np.clip((image - lo) / max(float(hi - lo), 1e-6), -1.0, 2.0).astype(np.float32)
        work_shape = tuple(max(1, int(round(n * scale))) for n in image.shape)
        work_img = _zoom(normalised, work_shape, order=1)
        original = _zoom(labels, work_shape, order=0)
        # holes filled, instances scored piece by piece, each piece times its cover (scored_pieces)
        filled, work_lab, cover, owner, component = scored_pieces(original, necks)
        tri = trinary(filled)
        sizes = np.bincount(work_lab.ravel())
        typical = typical_size(work_lab) if sizes[1:].any() else math.inf
        min_count = COUNT_FRACTION * typical
        counted = sizes >= min_count
        counted[0] = False
        counted_ids = np.unique(owner[counted])
        # instances in two or more connected pieces, and pieces cut into two or more bodies at necks
        component_owner = np.zeros(int(component.max()) + 1, np.int64)
        component_owner[component] = owner
        in_pieces = int(np.count_nonzero(np.bincount(component_owner[np.unique(component[counted])]) >= 2))
        cut_components = np.flatnonzero(np.bincount(component[counted]) >= 2)
        cut_at_necks = int(np.unique(component_owner[cut_components]).size)
        holed = np.bincount(filled[original == 0], minlength=int(filled.max()) + 1)
        with_holes = int(np.count_nonzero(holed[counted_ids[counted_ids > 0]]))
        # pad to at least one patch per axis: background-like image, no labels
        pad = [(0, max(0, p - n)) for n in work_shape]
        if any(b for _, b in pad):
            background = float(np.percentile(work_img, 5))
            work_img = np.pad(work_img, pad, mode="constant", constant_values=background)
            work_lab = np.pad(work_lab, pad, mode="constant")
            tri = np.pad(tri, pad, mode="constant")
        starts = [tile_starts(n, p, overlap) for n in work_img.shape]
        grids = np.meshgrid(*starts, indexing="ij")
        corners = np.stack([g.ravel() for g in grids], axis=1)
        boxes = [tuple(slice(int(c), int(c) + p) for c in corner) for corner in corners]
        img_patches = np.stack([work_img[b] for b in boxes])
        tri_patches = np.stack([tri[b] for b in boxes])
        preds = self.predict_patches(img_patches, tri_patches)
        nb = self.config.n_bounded
        preds[:, nb:] /= scale  # distances: working-grid px -> px of the input image
        # per instance: mean prediction of the patches holding it, weighted by its pixels in each
        inst_sum = np.zeros((sizes.size, preds.shape[1]), np.float64)
        inst_px = np.zeros(sizes.size, np.float64)
        total = np.zeros(work_img.shape, np.float64)
        count = np.zeros(work_img.shape, np.float64)
        rows = []
        axes_names = ("z0", "y0", "x0")[3 - ndim:]
        for b, corner, pred in zip(boxes, corners, preds):
            total[b] += pred[0]
            count[b] += 1.0
            present, pixels = np.unique(work_lab[b], return_counts=True)
            keep = counted[present]
            n_inst = int(np.count_nonzero(keep))
            inst_sum[present[keep]] += pixels[keep, None] * pred[None, :]
            inst_px[present[keep]] += pixels[keep]
            row: dict[str, Any] = {}
            if z_index is not None:
                row["z0"] = z_index
            for name, c in zip(axes_names, corner):
                row[name] = int(min(round(c / scale), image.shape[axes_names.index(name)] - 1))
            row["size"] = int(round(p / scale))
            row["seg"] = float(pred[0])
            for k, target in enumerate(self.config.targets[1:], start=1):
                row[target] = float(pred[k])
            row["n_instances"] = n_inst
            rows.append(row)
        heat_work = (total / np.maximum(count, 1.0))[tuple(slice(0, n) for n in work_shape)].astype(np.float32)
        heat = _zoom(heat_work, image.shape, order=0)
        held = np.flatnonzero(inst_px > 0)
        # a piece's qualities times its cover (SEG's bound, scored_pieces); distances are not scaled
        factor = np.ones((held.size, preds.shape[1]))
        factor[:, :nb] = cover[held, None]
        scores = inst_sum[held] / inst_px[held, None] * factor
        if nb < preds.shape[1]:  # a piece's or body's distances include the rest of its instance's outline
            columns = [self.config.targets.index(t) if t in self.config.targets else None for t in DISTANCE_TARGETS]
            others = distances_to_other_pieces(work_lab, owner)  # padding adds no piece
            for row, piece in enumerate(held):
                if int(piece) in others:
                    n_outline, other = others[int(piece)]
                    own = [scores[row, c] if c is not None else math.nan for c in columns]
                    for c, value in zip(columns, combine_distances(*own, n_outline, other / scale)):
                        if c is not None:
                            scores[row, c] = value
        instances = (scores,
                     np.maximum(1.0, sizes[held] / typical) if held.size else np.zeros(0), in_pieces, with_holes,
                     cut_at_necks)
        return rows, heat, preds, instances

    # The QC protocol of SegQCLib.qc, for consumers that hold a Volume and a mask.
    def assess(self, image, mask: np.ndarray, label: str = "nuclei", *, threshold: float = DEFAULT_FLAG_THRESHOLD,
               all_slices: bool = True) -> QCResult:
        """:meth:`assess_instances` wrapped as a :class:`~SegQCLib.qc.QCResult`: ``volume = {"seg": image
        score}`` (plus ``mhd95`` and ``asd`` in px for a model with distance heads), no slice rows, the JSON
        of the patches under ``extra``. ``image`` is a Volume or an array; ``mask`` is an instance label
        image (a bool mask is split into connected components)."""
        array = getattr(image, "array", image)
        if self.config.dims == 2 and np.asarray(array).ndim == 3 and np.asarray(array).shape[0] == 1:
            array, mask = np.asarray(array)[0], np.asarray(mask)[0]
        result = self.assess_instances(array, mask)
        payload = result.to_json_dict()
        volume = {"seg": result.image_score}
        volume.update({t: result.extra["image_scores"][t] for t in DISTANCE_TARGETS if t in self.config.targets})
        volume.update({f"{t}{end}": result.extra["image_scores"][f"{t}{end}"] for t in list(volume)
                       for end in ("_lo", "_hi") if f"{t}{end}" in result.extra["image_scores"]})
        extra = {"patches": payload["patches"], "scale": payload["scale"]}
        if "interval" in result.extra:
            extra["interval"] = result.extra["interval"]
        return QCResult(model=self.name, label=label, volume=volume, slices=[],
                        threshold=threshold, runtime_s=result.runtime_s, extra=extra)


# ------------------------------------------------------------------------------------ weights
def save_model(net: RibCageNet, config: QANetConfig, path: str | Path, card: dict[str, Any] | None = None,
               half: bool = False) -> Path:
    """Write ``<path>.safetensors`` (float16 with ``half``) and the model card ``<path>.json``.

    The card holds ``architecture`` "qanet", ``name``, ``dims``, ``fusion``, ``encoding``, ``patch``,
    ``config`` (everything to rebuild the net, including the naive/siamese ``stream_mult``),
    ``weights``, ``priority`` (0) and whatever ``card`` adds (description, metrics, data).
    """
    from safetensors.torch import save_file

    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in net.state_dict().items()}
    save_file(state, str(stem.with_suffix(".safetensors")))
    data = {"description": f"QANet ({config.fusion}, {config.encoding}, {config.dims}D) predicted SEG of "
                           "microscopy instance segmentations", "priority": 0}
    data.update(card or {})
    data.update({"architecture": ARCHITECTURE, "name": data.get("name", stem.name), "dims": config.dims,
                 "fusion": config.fusion, "encoding": config.encoding, "patch": config.patch,
                 "config": config.to_dict(), "stream_mult": float(net.stream_mult),
                 "weights": stem.with_suffix(".safetensors").name})
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2))
    return stem.with_suffix(".json")


def load_model(card_path: str | Path, device: str = "cpu") -> QANetQC:
    """Load a QANet from its model card (``.json``) and the safetensors file it names.

    ``device``: "cpu", "cuda" or "auto" (CUDA when present). Weights stored as float16 are cast back
    to float32. Raises :class:`InputError` for an unreadable card or weights that do not fit.
    """
    from safetensors.torch import load_file

    from ..qc import resolve_device

    card_path = Path(card_path)
    try:
        card = json.loads(card_path.read_text())
        if card.get("architecture") != ARCHITECTURE:
            raise KeyError("architecture is not 'qanet'")
        config = QANetConfig.from_dict(card["config"])
        weights = card_path.parent / card["weights"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(card_path, f"not a QANet model card ({err})") from None
    net = RibCageNet(config, float(card.get("stream_mult", 1.0)))
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise InputError(weights, f"cannot read weights ({err})") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(weights, f"weights do not fit the card's architecture ({str(err)[:200]})") from None
    return QANetQC(card.get("name", card_path.stem), net, config, device=resolve_device(device), card=card)
