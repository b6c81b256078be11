"""Calibration data: real samples for a model's graph inputs, split into a *fit* share (what later
stages may learn from) and a *held-out* share (never used for fitting; fidelity is measured there).

Sources (``CalibSpec``):
- ``.npz``: one array per graph input, keyed by the input's name, samples on axis 0;
- ``.npy``: one array, for models with a single graph input;
- a folder of ``.npz``/``.npy`` files (sorted by name, not recursive): concatenated on axis 0;
- a folder of images (``ImageSpec``, recursive, sorted): decoded with Pillow, resized to H x W
  (bilinear, no crop), values ``(pixel / 255 - mean) / std`` per channel, in RGB or BGR order, laid out
  NCHW or NHWC, in the input's float dtype; single-input models only.

Terms: a *sample* is one row along axis 0. Axis 0 of every graph input is the sample axis: the arrays
have the input's rank, its dtype exactly (no casts), and its fixed dims on every other axis; dynamic
dims must agree between files. A *view* (``CalibView``) is a sorted list of sample indices read in
*batches* of consecutive view positions. When the model fixes axis 0 to ``B``, every run takes
exactly ``B`` samples and each share is cut to a multiple of ``B``.

The split is deterministic: the samples are permuted with ``numpy.random.default_rng(seed)``;
``--calib-samples N`` keeps the first N of that order, and the first ``ceil(holdout * N)`` of those
are held out. Both shares are sorted, so a pass reads the files in order.

Memory bound. Opening reads headers only (image files: their headers). A batch of ``b`` samples holds
``b * sample_bytes`` (the sum over inputs of one sample's bytes), read from:
- ``.npy`` files and ``.npz`` members stored uncompressed (``numpy.savez``): memory-mapped, only the
  batch's rows are read, so a set larger than RAM works;
- ``.npz`` members stored compressed (``numpy.savez_compressed``): loaded whole when a batch first
  touches them, one file's members at a time (the bound is then the largest file's arrays);
- images: decoded one by one into the batch.
Object (pickled) arrays are never loaded (``allow_pickle`` is never set).
"""

from __future__ import annotations

import logging
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.ir.graph import input_feeds_spec, value_dims

try:  # optional: only --calib-images needs it
    from PIL import Image, UnidentifiedImageError
except ImportError:  # pragma: no cover - depends on the environment
    Image = None
    UnidentifiedImageError = OSError

log = logging.getLogger(__name__)

DEFAULT_HOLDOUT = 0.2
DEFAULT_SEED = 0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LAYOUTS = ("nchw", "nhwc")
CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass(frozen=True)
class ImageSpec:
    """A folder of images and the preprocessing that turns each into one sample."""

    folder: str
    size: tuple[int, int] | None = None  # (H, W); None: the model's fixed H and W
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "nchw"
    channels: str = "rgb"


@dataclass(frozen=True)
class CalibSpec:
    """What calibration data to use: ``path`` (.npz, .npy or a folder of them) or ``images``."""

    path: str | None = None
    images: ImageSpec | None = None
    samples: int | None = None  # at most this many samples (None: all)
    holdout: float = DEFAULT_HOLDOUT  # share held out, in (0, 1)
    seed: int = DEFAULT_SEED


# ----------------------------------------------------------------------------------------------
# chunks: one array of one input in one file, read by row


class _Chunk:
    """Rows of one input from one file: ``rows``, ``sample_shape``, ``dtype``; ``read(idx)``."""

    path: str
    rows: int
    sample_shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, idx: np.ndarray, cache: _Cache) -> np.ndarray:
        raise NotImplementedError


class _Cache:
    """The whole-file arrays of one compressed .npz at a time (the memory bound's second case)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.arrays: dict[str, np.ndarray] = {}

    def member(self, path: str, name: str) -> np.ndarray:
        if self.key != path:  # drop the previous file's arrays before loading the next file's
            self.key, self.arrays = path, {}
        if name not in self.arrays:
            try:
                with zipfile.ZipFile(path) as zf, zf.open(name) as f:
                    self.arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
                raise UserError(f"calibration file {path}: cannot read '{name}' ({_why(exc)})") from None
        return self.arrays[name]


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _take(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (sorted) of ``arr`` as a new in-memory array: a slice when they are consecutive."""
    if len(idx) and int(idx[-1]) - int(idx[0]) + 1 == len(idx):
        return np.array(arr[int(idx[0]):int(idx[-1]) + 1], order="C")
    return np.ascontiguousarray(arr[idx])


class _MappedChunk(_Chunk):
    """A memory-mapped array: a .npy file, or a .npz member stored uncompressed."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype, fortran: bool):
        self.path, self.offset, self.shape, self.dtype, self.fortran = path, offset, shape, dtype, fortran
        self.rows, self.sample_shape = shape[0], tuple(shape[1:])
        self._map: np.ndarray | None = None

    def read(self, idx: np.ndarray, cache: _Cache) -> np.ndarray:
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape,
                                      order="F" if self.fortran else "C")
            except (OSError, ValueError) as exc:
                raise UserError(f"calibration file {self.path}: cannot map ({_why(exc)})") from None
        try:
            return _take(self._map, idx)
        except OSError as exc:  # the file shrank or vanished under the map
            raise UserError(f"calibration file {self.path}: cannot read ({_why(exc)})") from None


class _CompressedChunk(_Chunk):
    def __init__(self, path: str, member: str, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.member, self.dtype = path, member, dtype
        self.rows, self.sample_shape = shape[0], tuple(shape[1:])

    def read(self, idx: np.ndarray, cache: _Cache) -> np.ndarray:
        return _take(cache.member(self.path, self.member), idx)


def _header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy stream ``f``; UserError for anything else."""
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f, max_header_size=10000)
    except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile, struct.error, zlib.error) as exc:
        raise UserError(f"calibration file {where} is not a valid .npy array ({_why(exc)})") from None
    if dtype.hasobject:
        raise UserError(f"calibration file {where} holds Python objects (a pickle); only numeric arrays "
                        "are read, never pickles")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise UserError(f"calibration file {where} holds a structured dtype ({dtype}); give plain numeric arrays")
    if len(shape) == 0:
        raise UserError(f"calibration file {where} holds a scalar; samples go on axis 0")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _npy_chunk(path: str) -> _MappedChunk:
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = _header(f, path)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise UserError(f"calibration file {path} cannot be read ({exc.strerror or _why(exc)})") from None
    need = offset + math.prod(shape) * dtype.itemsize
    if size < need:
        raise UserError(f"calibration file {path} is truncated ({size} bytes, its header needs {need})")
    return _MappedChunk(path, offset, shape, dtype, fortran)


def _npz_chunks(path: str) -> dict[str, _Chunk]:
    """One chunk per member of a .npz (numpy's ``name.npy`` members), headers only."""
    out: dict[str, _Chunk] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if not info.filename.endswith(".npy"):
                    raise UserError(f"calibration file {path}: member '{info.filename}' is not a numpy array "
                                    "(write the file with numpy.savez)")
                if info.flag_bits & 0x1:
                    raise UserError(f"calibration file {path}: member '{info.filename}' is encrypted")
                where = f"{path}:{info.filename}"
                with zf.open(info) as f:
                    shape, fortran, dtype = _header(f, where)
                    hdr = f.tell()
                need = hdr + math.prod(shape) * dtype.itemsize
                if info.file_size < need:
                    raise UserError(f"calibration file {where} is truncated ({info.file_size} bytes, needs {need})")
                name = info.filename[:-4]
                if info.compress_type == zipfile.ZIP_STORED:
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    if len(local) != 30 or local[:4] != b"PK\x03\x04":
                        raise UserError(f"calibration file {path} is not a valid .npz (bad local header)")
                    n_name, n_extra = struct.unpack("<HH", local[26:30])
                    start = info.header_offset + 30 + n_name + n_extra
                    out[name] = _MappedChunk(path, start + hdr, shape, dtype, fortran)
                else:
                    out[name] = _CompressedChunk(path, info.filename, shape, dtype)
    except UserError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            zlib.error) as exc:
        raise UserError(f"calibration file {path} is not a valid .npz ({_why(exc)})") from None
    if not out:
        raise UserError(f"calibration file {path} holds no arrays")
    return out


# ----------------------------------------------------------------------------------------------
# columns: every chunk of one input, concatenated


class _Column:
    def __init__(self, name: str, chunks: list[_Chunk]):
        self.name, self.chunks = name, chunks
        self.starts = np.cumsum([0] + [c.rows for c in chunks])
        self.sample_shape, self.dtype = chunks[0].sample_shape, chunks[0].dtype

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def read(self, idx: np.ndarray, cache: _Cache) -> np.ndarray:
        """Rows ``idx`` (global, sorted) across the chunks."""
        if not len(idx):
            raise ValueError("no rows asked")
        parts = []
        which = np.searchsorted(self.starts, idx, side="right") - 1
        for ci in np.unique(which):
            local = idx[which == ci] - self.starts[ci]
            parts.append(self.chunks[ci].read(local, cache))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


class _ImageColumn(_Column):
    def __init__(self, name: str, files: list[str], spec: ImageSpec, size: tuple[int, int], dtype: np.dtype):
        self.name, self.files, self.spec, self.size, self.dtype = name, files, spec, size, dtype
        h, w = size
        self.sample_shape = (3, h, w) if spec.layout == "nchw" else (h, w, 3)
        self.chunks = []
        self.starts = np.array([0, len(files)])
        order = [0, 1, 2] if spec.channels == "rgb" else [2, 1, 0]
        self._mean = np.asarray(spec.mean, np.float32)[order]
        self._std = np.asarray(spec.std, np.float32)[order]
        self._order = order

    def read(self, idx: np.ndarray, cache: _Cache) -> np.ndarray:
        out = np.empty((len(idx), *self.sample_shape), dtype=self.dtype)
        h, w = self.size
        for k, i in enumerate(idx):
            path = self.files[int(i)]
            try:
                with Image.open(path) as im:
                    rgb = im.convert("RGB").resize((w, h), Image.BILINEAR)
                    arr = np.asarray(rgb, dtype=np.float32) / 255.0
            except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
                raise UserError(f"calibration image {path} cannot be decoded ({_why(exc)})") from None
            arr = (arr[:, :, self._order] - self._mean) / self._std
            out[k] = arr.transpose(2, 0, 1) if self.spec.layout == "nchw" else arr
        return out


# ----------------------------------------------------------------------------------------------
# the data and its views


@dataclass(frozen=True, eq=False)
class Batch:
    """One run's worth of samples: ``feeds`` (input name -> array with ``n`` rows), the view positions
    ``start:start+n`` and the samples' global indices (``indices``, for per-sample seeds)."""

    start: int
    indices: np.ndarray
    feeds: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return len(self.indices)


class CalibView:
    """A share of the calibration data (``CalibData.fit`` or ``.holdout``): ``n`` samples, read in
    batches. ``batch_rows``: the samples every run must take (the model fixes axis 0), else None."""

    def __init__(self, data: CalibData, name: str, indices: np.ndarray):
        self.data, self.name, self.indices = data, name, np.asarray(indices, dtype=np.int64)

    @property
    def n(self) -> int:
        return len(self.indices)

    @property
    def batch_rows(self) -> int | None:
        return self.data.batch_rows

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample over every input (what a batch of b samples holds: b times this)."""
        return self.data.sample_bytes

    def read(self, start: int, stop: int) -> Batch:
        """The samples at view positions ``start:stop``."""
        idx = self.indices[start:stop]
        return Batch(start, idx, {name: col.read(idx, self.data.cache) for name, col in self.data.columns.items()})

    def batches(self, size: int) -> Iterator[Batch]:
        """Consecutive batches of ``size`` samples (``batch_rows`` when the model fixes it); the last
        may be shorter unless the model fixes the batch."""
        size = self.batch_rows or max(1, int(size))
        for start in range(0, self.n, size):
            yield self.read(start, min(start + size, self.n))

    def to_json(self) -> dict:
        return {"share": self.name, "samples": self.n}


class CalibData:
    """Calibration samples validated against a model's graph inputs, with ``fit`` and ``holdout``
    views (disjoint, deterministic for a given seed). Made by ``open_calib``."""

    def __init__(self, columns: dict[str, _Column], source: str, spec: CalibSpec, batch_rows: int | None):
        self.columns, self.source, self.spec, self.batch_rows = columns, source, spec, batch_rows
        self.cache = _Cache()
        self.available = next(iter(columns.values())).rows
        self.inputs = {n: (tuple(c.sample_shape), np.dtype(c.dtype)) for n, c in columns.items()}
        self.sample_bytes = sum(math.prod(s) * d.itemsize for s, d in self.inputs.values())
        fit, hold = split(self.available, spec.holdout, spec.seed, spec.samples, batch_rows)
        self.fit = CalibView(self, "fit", fit)
        self.holdout = CalibView(self, "holdout", hold)

    @property
    def n(self) -> int:
        return self.fit.n + self.holdout.n

    def to_json(self) -> dict:
        return {"source": self.source, "available": self.available, "used": self.n, "fit": self.fit.n,
                "holdout": self.holdout.n, "holdout_share": self.spec.holdout, "seed": self.spec.seed,
                "inputs": {n: {"sample_shape": list(s), "dtype": str(d)} for n, (s, d) in self.inputs.items()}}


def split(n: int, holdout: float, seed: int = DEFAULT_SEED, samples: int | None = None,
          batch_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit, holdout) sample indices, each sorted, disjoint: the first ``min(samples, n)`` of a seeded
    permutation, the first ``ceil(holdout * used)`` of those held out; with ``batch_rows`` each share
    is cut to a multiple of it. UserError when a share would be empty."""
    if not 0.0 < holdout < 1.0:
        raise UserError(f"--holdout must be in (0, 1), got {holdout:g}")
    if n < 2:
        raise UserError(f"calibration data holds {n} sample(s); at least 2 are needed (some to fit, "
                        "some held out)")
    used = n if samples is None else min(int(samples), n)
    if used < 2:
        raise UserError(f"--calib-samples {used}: at least 2 samples are needed (some to fit, some held out)")
    order = np.random.default_rng(seed).permutation(n)[:used]
    n_hold = math.ceil(holdout * used - 1e-9)
    if n_hold >= used:
        raise UserError(f"--holdout {holdout:g} of {used} samples leaves nothing to fit; give more samples "
                        "or a smaller --holdout")
    hold, fit = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    if batch_rows and batch_rows > 1:
        if len(hold) < batch_rows or len(fit) < batch_rows:
            raise UserError(f"the model fixes its batch to {batch_rows} samples: {len(fit)} to fit and "
                            f"{len(hold)} held out leave a share without a whole batch; give more samples")
        hold, fit = hold[:len(hold) // batch_rows * batch_rows], fit[:len(fit) // batch_rows * batch_rows]
    return fit, hold


# ----------------------------------------------------------------------------------------------
# opening


def _input_specs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Graph inputs the data must give: all but the initializers that double as inputs (defaults)."""
    inits = {t.name for t in model.graph.initializer}
    return {vi.name: vi for vi in input_feeds_spec(model) if vi.name not in inits}


def _np_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    if not vi.type.HasField("tensor_type"):
        raise UserError(f"input '{vi.name}' is not a tensor; calibration data feeds tensors only")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))


def _batch_rows(specs: dict[str, onnx.ValueInfoProto]) -> int | None:
    fixed = {}
    for name, vi in specs.items():
        dims = value_dims(vi) or []
        if dims and isinstance(dims[0], int) and dims[0] > 0:
            fixed[name] = dims[0]
    if len(set(fixed.values())) > 1:
        raise UserError("the model's inputs fix different batch sizes on axis 0 ("
                        + ", ".join(f"{k}: {v}" for k, v in fixed.items()) + "); cannot batch calibration samples")
    return next(iter(fixed.values()), None)


def _check_column(name: str, vi: onnx.ValueInfoProto, sample_shape: tuple[int, ...], dtype: np.dtype,
                  where: str) -> None:
    want = _np_dtype(vi)
    if np.dtype(dtype) != want:
        raise UserError(f"calibration input '{name}' ({where}): dtype {np.dtype(dtype)}, the model takes {want} "
                        f"(convert with .astype(numpy.{want.name}))")
    dims = value_dims(vi)
    if dims is None:
        return
    if len(sample_shape) + 1 != len(dims):
        raise UserError(f"calibration input '{name}' ({where}): rank {len(sample_shape) + 1} (samples on axis 0), "
                        f"the model declares rank {len(dims)}")
    for ax, (g, d) in enumerate(zip(sample_shape, dims[1:], strict=True), start=1):
        if isinstance(d, int) and d > 0 and g != d:
            raise UserError(f"calibration input '{name}' ({where}): dim {ax} is {g}, the model fixes it to {d}")
        if g < 1:
            raise UserError(f"calibration input '{name}' ({where}): dim {ax} is {g}; every dim must be >= 1")


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".npz", ".npy"))
        if not files:
            raise UserError(f"calibration folder {path} holds no .npz or .npy files")
        return files
    if not path.exists():
        raise UserError(f"no such calibration file or folder: {path}")
    if path.suffix.lower() not in (".npz", ".npy"):
        raise UserError(f"calibration file {path}: expected .npz, .npy or a folder of them")
    return [path]


def _array_columns(spec: CalibSpec, specs: dict[str, onnx.ValueInfoProto]) -> dict[str, _Column]:
    files = _files_of(Path(spec.path))
    names = sorted(specs)
    chunks: dict[str, list[_Chunk]] = {n: [] for n in names}
    for f in files:
        if f.suffix.lower() == ".npy":
            if len(names) != 1:
                raise UserError(f"calibration file {f} is a .npy, but the model has {len(names)} inputs "
                                f"({', '.join(names)}); give a .npz keyed by input name")
            got = {names[0]: _npy_chunk(str(f))}
        else:
            got = _npz_chunks(str(f))
        unknown = sorted(set(got) - set(names))
        if unknown:
            raise UserError(f"calibration file {f}: '{unknown[0]}' is not a graph input "
                            f"(inputs: {', '.join(names)})")
        missing = [n for n in names if n not in got]
        if missing:
            raise UserError(f"calibration file {f} has no array for input '{missing[0]}' "
                            f"(inputs: {', '.join(names)})")
        rows = {n: c.rows for n, c in got.items()}
        if len(set(rows.values())) > 1:
            raise UserError(f"calibration file {f}: inputs hold different numbers of samples ("
                            + ", ".join(f"{k}: {v}" for k, v in rows.items()) + ")")
        for n, c in got.items():
            _check_column(n, specs[n], c.sample_shape, c.dtype, str(f))
            first = chunks[n][0] if chunks[n] else None
            if first is not None and first.sample_shape != c.sample_shape:
                raise UserError(f"calibration input '{n}': samples of shape {list(c.sample_shape)} in {f} "
                                f"and {list(first.sample_shape)} in {first.path} cannot be concatenated")
            chunks[n].append(c)
    return {n: _Column(n, cs) for n, cs in chunks.items()}


def _image_columns(spec: ImageSpec, specs: dict[str, onnx.ValueInfoProto]) -> dict[str, _Column]:
    if Image is None:
        raise UserError("--calib-images needs Pillow: pip install 'onnxprune[images]' (or pip install pillow)")
    if len(specs) != 1:
        raise UserError(f"--calib-images feeds a single-input model; this one has {len(specs)} inputs "
                        f"({', '.join(sorted(specs))}); give a .npz instead")
    if spec.layout not in LAYOUTS or spec.channels not in CHANNEL_ORDERS:
        raise UserError(f"image layout must be one of {LAYOUTS} and channels one of {CHANNEL_ORDERS}")
    if any(s == 0 for s in spec.std):
        raise UserError("--std: every value must be non-zero")
    (name, vi), = specs.items()
    dtype = _np_dtype(vi)
    if not np.issubdtype(dtype, np.floating):
        raise UserError(f"--calib-images: input '{name}' takes {dtype}; images become float arrays")
    dims = value_dims(vi) or []
    if len(dims) != 4:
        raise UserError(f"--calib-images: input '{name}' has rank {len(dims)}; images need a rank-4 input")
    h_ax, w_ax = (2, 3) if spec.layout == "nchw" else (1, 2)
    size = spec.size
    if size is None:
        h, w = dims[h_ax], dims[w_ax]
        if not (isinstance(h, int) and h > 0 and isinstance(w, int) and w > 0):
            raise UserError(f"--calib-images: input '{name}' has dynamic height/width; give --image-size H,W")
        size = (h, w)
    folder = Path(spec.folder)
    if not folder.is_dir():
        raise UserError(f"--calib-images: no such folder: {folder}")
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--calib-images: folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for f in files:  # headers only: a file that is no image fails here, before any work
        try:
            with Image.open(f) as im:
                im.size  # noqa: B018 - reading the header is the check
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise UserError(f"calibration image {f} is not a readable image ({_why(exc)})") from None
    col = _ImageColumn(name, files, spec, size, dtype)
    _check_column(name, vi, col.sample_shape, dtype, str(folder))
    return {name: col}


def open_calib(model: onnx.ModelProto, spec: CalibSpec) -> CalibData:
    """Validate ``spec``'s data against ``model``'s graph inputs (headers only) and split it.
    Every problem is a one-line UserError: unknown or missing input names, wrong dtype, rank or
    fixed dims, too few samples, a corrupt file, an empty folder, pickled arrays."""
    if (spec.path is None) == (spec.images is None):
        raise UserError("give calibration data with exactly one of --calib and --calib-images")
    specs = _input_specs(model)
    if not specs:
        raise UserError("the model has no graph inputs to calibrate")
    if spec.images is not None:
        columns, source = _image_columns(spec.images, specs), f"images:{spec.images.folder}"
    else:
        columns, source = _array_columns(spec, specs), str(spec.path)
    rows = {n: c.rows for n, c in columns.items()}
    if len(set(rows.values())) > 1:
        raise UserError("calibration inputs hold different numbers of samples ("
                        + ", ".join(f"{k}: {v}" for k, v in rows.items()) + ")")
    data = CalibData(columns, source, spec, _batch_rows(specs))
    log.info("calibration data %s: %d samples (%d fit, %d held out)", source, data.n, data.fit.n, data.holdout.n)
    return data
