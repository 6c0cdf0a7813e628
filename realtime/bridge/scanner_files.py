"""The scanner's files: which volume a file belongs to (`probe`) and the volume itself (`read_volume`).

Formats, each read with the ecosystem's readers (pydicom for the file, nibabel's DICOM wrappers for
voxel order and geometry):

- NIfTI (`.nii`, `.nii.gz`): a 3D volume, or 4D with one volume. NIfTI has no series identity, so
  it comes from the file name: its last two numbers are the series number and the 1-based volume
  number (`001_000005_000012.nii`: series 5, index 11); a name with one number is series 0; the
  series UID is the folder and the series number. The acquisition time of day comes from
  `acq_s=<seconds>` in the header's `descrip`, when there.
- Siemens classic mosaic DICOM (one file per volume, slices tiled in one image; CSA header).
- Enhanced multi-frame MR DICOM (one file per volume, one frame per slice).
- One DICOM per slice (classic, any vendor): a volume is the slices sharing an acquisition number.

The voxel order is nibabel's: DICOM rows, then columns, then slices ascending along nibabel's slice
normal; `affine` maps it to RAS+ millimetres (DICOM's LPS+ with x and y negated), as nibabel's NIfTI
affines do. The index is the volume's acquisition (or instance) number minus one, never file time.

A file still being written (shorter than its own header says: no pixel data yet, fewer pixel
bytes than rows x columns x frames, a gzip stream that stops) raises `IncompleteFile`; anything
that is not a DICOM or NIfTI image raises `CorruptFile`. Both are one line naming the file. A DICOM
whose header ends at the end of the file without pixel data reads as incomplete: a watcher should
give such a file up as corrupt when it stops growing.
"""
from __future__ import annotations

import gzip
import io
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

with warnings.catch_warnings():  # nibabel.nicom warns that its *readers* are experimental; we use its wrappers
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import dicomwrappers

from mindeye.errors import FormatError

LPS_TO_RAS_44 = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient space -> nibabel's world
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
DICOM_PREFIX_BYTES = 132  # 128-byte preamble + "DICM"
FILE_META_MAX_BYTES = 1024  # a file shorter than this without complete file meta may still be growing
NIFTI1_HEADER_BYTES = 348
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_SPACING_TOLERANCE = 0.01  # relative: slices of one volume must be evenly spaced to this
NIFTI_NAME = re.compile(r"(?:(\d+)\D+)?(\d+)\D*$")  # ... series number, volume number (1-based)
ACQ_IN_DESCRIP = re.compile(r"acq_s=([0-9.]+)")


class IncompleteFile(FormatError):
    """A scanner file still being written (truncated); read it again once it stops growing."""

    def __init__(self, path: str | Path, found: str):
        super().__init__(path, "scanner file", "complete", f"{found} (still being written? read it again later)")


class CorruptFile(FormatError):
    """A file in the scanner folder that is not a readable DICOM or NIfTI image."""

    def __init__(self, path: str | Path, found: str):
        super().__init__(path, "scanner file", "a DICOM or NIfTI image", found)


@dataclass(frozen=True)
class FileKey:
    """Where one file belongs: series, volume index (0-based), and its part of that volume."""

    series_uid: str
    series_number: int
    index: int
    slice_or_part: int  # 0 for a whole-volume file; a slice's instance number otherwise
    parts_expected: int | None  # files per volume: 1, the slice count the header gives, or None (unknown)


@dataclass(frozen=True)
class ScannerVolume:
    """One volume as the scanner wrote it."""

    data_xyz: np.ndarray  # float32, nibabel's voxel order
    affine: np.ndarray  # (4, 4) voxel -> RAS+ mm
    series_uid: str
    series_number: int
    index: int  # 0-based in its series, from the acquisition / instance number
    tr_s: float | None
    acquired_s: float | None  # acquisition time of day (s) when the header has it
    paths: tuple[Path, ...]


def probe(path: str | Path) -> FileKey:
    """The volume `path` belongs to, from its header only (no pixel decoding)."""
    path = Path(path)
    if _is_nifti(path):
        _nifti(path)  # its checks: complete, and really NIfTI
        series_number, index = _nifti_numbers(path)
        return FileKey(_nifti_series_uid(path), series_number, index, 0, 1)
    dataset = _dicom(path, pixels=False)
    series_number = int(dataset.get("SeriesNumber") or 0)
    series_uid = str(dataset.get("SeriesInstanceUID") or f"series-{series_number}")
    if _whole_volume(dataset):
        return FileKey(series_uid, series_number, _volume_number(dataset, path) - 1, 0, 1)
    # one slice per file: the volume is the acquisition; the slice count, where the header gives it
    index = int(dataset.get("AcquisitionNumber") or dataset.get("TemporalPositionIdentifier") or 1) - 1
    n_slices = dataset.get("ImagesInAcquisition")
    return FileKey(series_uid, series_number, index, int(dataset.get("InstanceNumber") or 0),
                   int(n_slices) if n_slices else None)


def read_volume(paths) -> ScannerVolume:
    """The volume in `paths`: one NIfTI, one mosaic or enhanced DICOM, or a volume's slice files."""
    paths = (Path(paths),) if isinstance(paths, (str, Path)) else tuple(Path(p) for p in paths)
    if not paths:
        raise ValueError("read_volume needs at least one file")
    if _is_nifti(paths[0]):
        if len(paths) != 1:
            raise FormatError(paths[0], "NIfTI volume", "one file per volume", f"{len(paths)} files")
        return _read_nifti(paths[0])
    datasets = [_dicom(path, pixels=True) for path in paths]
    first = datasets[0]
    try:
        if len(datasets) == 1 and _whole_volume(first):
            wrapper = dicomwrappers.wrapper_from_data(first)
            data_xyz, affine_lps = wrapper.get_data(), wrapper.affine
        else:
            data_xyz, affine_lps = _stack_slices(datasets, paths)
    except (dicomwrappers.WrapperError, ValueError, KeyError, AttributeError, IndexError) as error:
        raise CorruptFile(paths[0], f"an image nibabel cannot place in space ({error})") from None
    if data_xyz.ndim == 4 and data_xyz.shape[3] == 1:
        data_xyz = data_xyz[..., 0]
    if data_xyz.ndim != 3:
        raise FormatError(paths[0], "DICOM volume", "one 3D volume", f"an array of shape {data_xyz.shape}")
    series_number = int(first.get("SeriesNumber") or 0)
    index = (_volume_number(first, paths[0]) if _whole_volume(first)
             else int(first.get("AcquisitionNumber") or first.get("TemporalPositionIdentifier") or 1)) - 1
    return ScannerVolume(np.asarray(data_xyz, dtype=np.float32), LPS_TO_RAS_44 @ affine_lps,
                         str(first.get("SeriesInstanceUID") or f"series-{series_number}"), series_number, index,
                         _dicom_tr_s(first), _dicom_acquired_s(first), paths)


# ---- DICOM ----------------------------------------------------------------------------------------------

def _dicom(path: Path, *, pixels: bool) -> pydicom.Dataset:
    """The file's dataset; IncompleteFile / CorruptFile when it is cut short / not DICOM."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(DICOM_PREFIX_BYTES)
            if len(prefix) < DICOM_PREFIX_BYTES:
                raise IncompleteFile(path, f"{size} bytes, less than a DICOM preamble")
            if prefix[128:132] != b"DICM":
                raise CorruptFile(path, "no 'DICM' marker at byte 128 and not a .nii / .nii.gz name")
            file.seek(0)
            with warnings.catch_warnings():  # pydicom warns on odd but readable headers; we check what we use
                warnings.simplefilter("ignore")
                dataset = pydicom.dcmread(file, stop_before_pixels=not pixels)
            if "TransferSyntaxUID" not in dataset.file_meta:  # a Part 10 file starts with it, ~200 bytes
                if size < FILE_META_MAX_BYTES:
                    raise IncompleteFile(path, f"{size} bytes, cut inside the DICOM file meta information")
                raise CorruptFile(path, "no DICOM file meta information after the 'DICM' marker")
            sop_class = dataset.get("SOPClassUID")
            if sop_class and "Image" not in sop_class.name:  # a report, a plan...: never an image
                raise CorruptFile(path, f"a DICOM {sop_class.name}, not an image")
            if pixels:
                present = len(dataset.PixelData) if "PixelData" in dataset else 0
            else:  # the header read stops where the pixel data element starts (or at the end of the file)
                element_header = 8 if dataset.file_meta.TransferSyntaxUID.is_implicit_VR else 12
                present = max(size - file.tell() - element_header, 0)
            if present == 0:
                raise IncompleteFile(path, f"a DICOM header that stops at byte {size} before any pixel data")
            _check_pixel_bytes(path, dataset, present)
    except (IncompleteFile, CorruptFile):
        raise
    except OSError as error:
        raise CorruptFile(path, f"an unreadable file ({error.strerror or error})") from None
    except Exception as error:  # pydicom raises many kinds on garbage; each means the same here
        raise CorruptFile(path, f"a DICOM that pydicom cannot parse ({type(error).__name__}: {error})") from None
    if "Rows" not in dataset or "Columns" not in dataset:
        raise CorruptFile(path, f"a DICOM without an image ({dataset.get('SOPClassUID', 'no SOP class')})")
    return dataset


def _check_pixel_bytes(path: Path, dataset: pydicom.Dataset, present: int) -> None:
    """Raise IncompleteFile when fewer pixel bytes are there than rows x columns x frames need."""
    if "Rows" not in dataset or "Columns" not in dataset or dataset.file_meta.TransferSyntaxUID.is_compressed:
        return  # compressed frames have no length up front; pydicom's decoder finds a cut-off stream
    n_bits = (int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("NumberOfFrames") or 1)
              * int(dataset.get("SamplesPerPixel") or 1) * int(dataset.get("BitsAllocated") or 16))
    expected = (n_bits + 7) // 8
    if present < expected:
        raise IncompleteFile(path, f"{present} of {expected} pixel bytes")


def _whole_volume(dataset: pydicom.Dataset) -> bool:
    """A whole volume in one file: enhanced multi-frame, or a Siemens mosaic."""
    return (dataset.get("SOPClassUID") == ENHANCED_MR or int(dataset.get("NumberOfFrames") or 1) > 1
            or "MOSAIC" in (dataset.get("ImageType") or ()))


def _volume_number(dataset: pydicom.Dataset, path: Path) -> int:
    number = dataset.get("InstanceNumber") or dataset.get("AcquisitionNumber")
    if not number or int(number) < 1:
        raise CorruptFile(path, "a volume without an instance or acquisition number >= 1")
    return int(number)


def _stack_slices(datasets: list[pydicom.Dataset], paths: tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One-slice-per-file DICOMs stacked in order along nibabel's slice normal: (X, Y, Z) and LPS affine."""
    wrappers = [dicomwrappers.wrapper_from_data(dataset) for dataset in datasets]
    normal_3 = wrappers[0].slice_normal
    for wrapper, path in zip(wrappers[1:], paths[1:]):
        if not np.allclose(wrapper.image_orient_patient, wrappers[0].image_orient_patient, atol=1e-4):
            raise FormatError(path, "slice orientation", f"that of {paths[0].name}", "another orientation")
    order = np.argsort([float(np.dot(normal_3, wrapper.image_position)) for wrapper in wrappers])
    wrappers = [wrappers[k] for k in order]
    affine_lps = wrappers[0].affine.copy()
    if len(wrappers) > 1:
        positions_k3 = np.stack([wrapper.image_position for wrapper in wrappers])
        steps_k3 = np.diff(positions_k3, axis=0)
        step_3 = (positions_k3[-1] - positions_k3[0]) / (len(wrappers) - 1)
        if not np.allclose(steps_k3, step_3, atol=SLICE_SPACING_TOLERANCE * np.linalg.norm(step_3)):
            raise FormatError(paths[0], "slice positions", "evenly spaced slices of one volume",
                              f"steps {np.linalg.norm(steps_k3, axis=1).round(3).tolist()} mm (a slice missing?)")
        affine_lps[:3, 2] = step_3
    return np.stack([wrapper.get_data() for wrapper in wrappers], axis=-1), affine_lps


def _dicom_tr_s(dataset: pydicom.Dataset) -> float | None:
    tr_ms = dataset.get("RepetitionTime")
    if tr_ms is None:  # enhanced MR keeps it in the shared functional groups
        try:
            tr_ms = dataset.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence[0].RepetitionTime
        except (AttributeError, IndexError):
            return None
    return float(tr_ms) / 1000.0 if tr_ms not in (None, "") else None


def _dicom_acquired_s(dataset: pydicom.Dataset) -> float | None:
    """Acquisition time of day in seconds: AcquisitionTime (TM), else the time in AcquisitionDateTime (DT)."""
    time_text = str(dataset.get("AcquisitionTime") or "")
    if not time_text and dataset.get("AcquisitionDateTime"):
        time_text = str(dataset.AcquisitionDateTime)[8:]
    match = re.match(r"(\d\d):?(\d\d):?(\d\d(?:\.\d+)?)", time_text)
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


# ---- NIfTI ----------------------------------------------------------------------------------------------

def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _nifti(path: Path) -> nib.Nifti1Image:
    """The file as a NIfTI image held in memory; IncompleteFile / CorruptFile when cut short / garbage."""
    try:
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
    except EOFError:
        raise IncompleteFile(path, "a gzip stream that stops before its end") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise CorruptFile(path, f"a .gz name but not gzip data ({error})") from None
    except OSError as error:
        raise CorruptFile(path, f"an unreadable file ({error.strerror or error})") from None
    if len(raw) < NIFTI1_HEADER_BYTES:
        raise IncompleteFile(path, f"{len(raw)} bytes, less than a NIfTI header")
    sizeof_hdr = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    if NIFTI1_HEADER_BYTES not in sizeof_hdr or raw[344:348] != b"n+1\0":  # nibabel would "fix" a bad size
        raise CorruptFile(path, "not a single-file NIfTI-1 header (sizeof_hdr 348, magic 'n+1')")
    try:
        image = nib.Nifti1Image.from_bytes(raw)
    except Exception as error:  # nibabel's header checks raise several kinds; each means "not NIfTI"
        raise CorruptFile(path, f"not a NIfTI-1 image ({type(error).__name__}: {error})") from None
    data_offset = max(int(nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:NIFTI1_HEADER_BYTES])).get_data_offset()),
                      NIFTI1_HEADER_BYTES + 4)
    expected = data_offset + int(np.prod(image.shape)) * image.get_data_dtype().itemsize
    if len(raw) < expected:
        raise IncompleteFile(path, f"{len(raw)} of {expected} bytes")
    return image


def _nifti_numbers(path: Path) -> tuple[int, int]:
    """(series number, 0-based index) from the file name (module docstring)."""
    stem = re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)
    match = NIFTI_NAME.search(stem)
    if match is None or int(match.group(2)) < 1:
        raise CorruptFile(path, "a NIfTI name without a 1-based volume number at its end (e.g. 001_000005_000012.nii)")
    return int(match.group(1) or 0), int(match.group(2)) - 1


def _nifti_series_uid(path: Path) -> str:
    """The series of a NIfTI: its folder and the series number in its name."""
    return f"{path.parent}#series-{_nifti_numbers(path)[0]}"


def _read_nifti(path: Path) -> ScannerVolume:
    image = _nifti(path)
    if len(image.shape) == 4 and image.shape[3] == 1:
        data_xyz = np.asanyarray(image.dataobj)[..., 0]
    elif len(image.shape) == 3:
        data_xyz = np.asanyarray(image.dataobj)
    else:
        raise FormatError(path, "NIfTI volume", "3D, or 4D with one volume", f"shape {image.shape}")
    zooms = image.header.get_zooms()
    tr_s = float(zooms[3]) * {"msec": 1e-3, "usec": 1e-6}.get(image.header.get_xyzt_units()[1], 1.0) \
        if len(zooms) == 4 and zooms[3] > 0 else None
    acquired = ACQ_IN_DESCRIP.search(image.header["descrip"].item().decode("latin-1", "replace"))
    series_number, index = _nifti_numbers(path)
    return ScannerVolume(np.asarray(data_xyz, dtype=np.float32), np.asarray(image.affine, dtype=float),
                         _nifti_series_uid(path), series_number, index, tr_s,
                         float(acquired.group(1)) if acquired else None, (path,))
