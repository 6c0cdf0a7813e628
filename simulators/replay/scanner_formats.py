"""How a scanner encodes one volume: NIfTI, Siemens mosaic, enhanced multi-frame or one DICOM per slice.

`volume_files` gives a volume's files as (name, bytes); simulators.replay.scanner_folder paces and
writes them. Names are `001_SSSSSS_NNNNNN.dcm` (`.nii`): series number S, and N the 1-based volume
number (or, one file per slice, the instance number, running through the series).

Geometry (`SliceGeometry`): DICOM files hold int16 (values rounded, as a scanner's integer output);
rows follow the volume's y axis and columns its x axis, slices ascend along DICOM's normal (row x
column direction cosines) as in a Siemens axial EPI, and positions / orientations are those of the
source affine (LPS+). Every DICOM carries series number and UID, instance and acquisition numbers,
acquisition date and time, RepetitionTime; the mosaic adds the Siemens CSA image header
(NumberOfImagesInMosaic, SliceNormalVector, AcquisitionMatrixText) and series header (the ASCCONV
slice list dicom2nifti reads), the enhanced file per-frame positions and dimension indices, and the
slice files ImagesInAcquisition. The NIfTI is 4D with one volume (TR in pixdim[4], `acq_s=<time of
day>` in descrip). UIDs are deterministic: a rerun writes the same files.
"""
from __future__ import annotations

import datetime
import io
import struct
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mindeye.protocol import RunStart

FORMATS = ("nifti", "mosaic", "enhanced", "slices")
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
LPS_FROM_RAS_44 = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
CSA_CHECK = 77  # the constant Siemens writes after counts in CSA2 headers
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, with deterministic suffixes from our entropy


@dataclass(frozen=True)
class SeriesInfo:
    """What every file of one run's series shares."""

    subject: str
    session: str
    run: int
    series_number: int
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    tr_s: float


def series_info(run_start: RunStart, series_number: int) -> SeriesInfo:
    """Deterministic UIDs from the session, run and series number (a rerun writes the same files)."""
    def uid(*parts) -> str:
        return generate_uid(UID_ROOT, entropy_srcs=[str(part) for part in parts])

    return SeriesInfo(run_start.subject, run_start.session, run_start.run, series_number,
                      uid(run_start.session, run_start.run, series_number), uid(run_start.session, "study"),
                      uid(run_start.session, "frame of reference"), run_start.tr_s)


def volume_files(volume_xyz: np.ndarray, affine: np.ndarray, info: SeriesInfo, index: int,
                 acquired: datetime.datetime, file_format: str) -> list[tuple[str, bytes]]:
    """One volume's files as (name, bytes) in `file_format`: one file, or one per slice (slices)."""
    name = _file_name(info, _first_number(index, volume_xyz.shape[2], file_format), file_format)
    if file_format == "nifti":
        return [(name, _nifti_bytes(volume_xyz, affine, info.tr_s, acquired))]
    if file_format == "mosaic":
        return [(name, _mosaic_bytes(volume_xyz, affine, info, index, acquired))]
    if file_format == "enhanced":
        return [(name, _enhanced_bytes(volume_xyz, affine, info, index, acquired))]
    return _slice_files(volume_xyz, affine, info, index, acquired)


def _first_number(index: int, n_slices: int, file_format: str) -> int:
    """The number in a volume's (first) file name: the volume number, or the instance number of its first slice."""
    return index * n_slices + 1 if file_format == "slices" else index + 1


def _file_name(info: SeriesInfo, number: int, file_format: str) -> str:
    return f"001_{info.series_number:06d}_{number:06d}" + (".nii" if file_format == "nifti" else ".dcm")


# ---- NIfTI ------------------------------------------------------------------------------------------------

def _nifti_bytes(volume_xyz: np.ndarray, affine: np.ndarray, tr_s: float, acquired: datetime.datetime) -> bytes:
    image = nib.Nifti1Image(np.asarray(volume_xyz)[..., None], affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_zooms(image.header.get_zooms()[:3] + (tr_s,))
    image.header["descrip"] = f"acq_s={_seconds_of_day(acquired):.6f}".encode()
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image.to_bytes()


# ---- DICOM ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SliceGeometry:
    """How a volume's voxels lie as DICOM slices (LPS+): rows along y, columns along x, slices along the normal."""

    row_cosine_3: np.ndarray  # IOP[:3]: direction of increasing column index (the volume's x axis)
    column_cosine_3: np.ndarray  # IOP[3:]: direction of increasing row index (the volume's y axis)
    pixel_spacing: tuple[float, float]  # (between rows = y spacing, between columns = x spacing)
    slice_spacing: float
    positions_k3: np.ndarray  # first voxel of each stored slice
    slice_order: np.ndarray  # stored slice k holds the volume's slice slice_order[k]

    @classmethod
    def of(cls, affine_ras: np.ndarray, n_slices: int) -> SliceGeometry:
        affine_lps = LPS_FROM_RAS_44 @ np.asarray(affine_ras, dtype=float)
        axes_33 = affine_lps[:3, :3]
        spacing_3 = np.linalg.norm(axes_33, axis=0)
        cosines_33 = axes_33 / spacing_3
        if not np.allclose(cosines_33.T @ cosines_33, np.eye(3), atol=1e-5):
            raise ValueError(f"a DICOM slice stack needs orthogonal voxel axes; this affine is sheared: "
                             f"{np.round(affine_ras, 4).tolist()}")
        normal_3 = np.cross(cosines_33[:, 0], cosines_33[:, 1])
        ascending = float(normal_3 @ cosines_33[:, 2]) > 0  # else store the slices in reverse
        slice_order = np.arange(n_slices) if ascending else np.arange(n_slices)[::-1]
        positions_k3 = affine_lps[:3, 3] + slice_order[:, None] * axes_33[:, 2][None, :]
        return cls(cosines_33[:, 0], cosines_33[:, 1], (float(spacing_3[1]), float(spacing_3[0])),
                   float(spacing_3[2]), positions_k3, slice_order)

    def slices_kyx(self, volume_xyz: np.ndarray) -> np.ndarray:
        """(Z, Y, X) pixel arrays (rows, columns) in stored order, int16."""
        values = np.rint(np.asarray(volume_xyz, dtype=np.float64))
        if values.min(initial=0) < -32768 or values.max(initial=0) > 32767:
            raise ValueError(f"volume values {values.min():g}..{values.max():g} do not fit the DICOM files' int16")
        return np.ascontiguousarray(values.astype(np.int16).transpose(2, 1, 0)[self.slice_order])

    @property
    def orientation(self) -> list[float]:
        return [round(float(v), 8) for v in (*self.row_cosine_3, *self.column_cosine_3)]


def _base_dataset(info: SeriesInfo, index: int, acquired: datetime.datetime, sop_class: str,
                  n_rows: int, n_columns: int) -> pydicom.Dataset:
    """The header fields every format shares: patient, study, series, instance, timing, pixel format."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(UID_ROOT, entropy_srcs=[info.series_uid, str(index)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    dataset.PatientName = dataset.PatientID = info.subject
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = info.study_uid, info.series_uid
    dataset.FrameOfReferenceUID = info.frame_of_reference_uid
    dataset.StudyID, dataset.StudyDescription = "1", info.session
    dataset.SeriesDescription = f"mindeye-replay run {info.run}"
    dataset.Modality, dataset.Manufacturer, dataset.ManufacturerModelName = "MR", "SIEMENS", "mindeye-replay"
    dataset.SeriesNumber = info.series_number
    dataset.InstanceNumber = dataset.AcquisitionNumber = index + 1
    dataset.StudyDate = dataset.SeriesDate = dataset.AcquisitionDate = dataset.ContentDate = acquired.strftime("%Y%m%d")
    dataset.AcquisitionTime = dataset.ContentTime = acquired.strftime("%H%M%S.%f")
    dataset.AcquisitionDateTime = acquired.strftime("%Y%m%d%H%M%S.%f")
    dataset.RepetitionTime = round(info.tr_s * 1000.0, 6)
    dataset.EchoTime, dataset.MagneticFieldStrength, dataset.ScanningSequence = 30.0, 3.0, "EP"
    dataset.Rows, dataset.Columns = n_rows, n_columns
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
    return dataset


def _mosaic_bytes(volume_xyz: np.ndarray, affine: np.ndarray, info: SeriesInfo, index: int,
                  acquired: datetime.datetime) -> bytes:
    n_x, n_y, n_z = volume_xyz.shape
    geometry = SliceGeometry.of(affine, n_z)
    tiles = int(np.ceil(np.sqrt(n_z)))
    mosaic_yx = np.zeros((tiles * n_y, tiles * n_x), dtype=np.int16)
    for k, slice_yx in enumerate(geometry.slices_kyx(volume_xyz)):  # tiles row by row, as nibabel unpacks them
        tile_row, tile_column = divmod(k, tiles)
        mosaic_yx[tile_row * n_y:(tile_row + 1) * n_y, tile_column * n_x:(tile_column + 1) * n_x] = slice_yx
    dataset = _base_dataset(info, index, acquired, MR_IMAGE, *mosaic_yx.shape)
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    dataset.ImageOrientationPatient = geometry.orientation
    dataset.PixelSpacing = list(geometry.pixel_spacing)
    dataset.SliceThickness = dataset.SpacingBetweenSlices = geometry.slice_spacing
    dataset.AcquisitionMatrix = [0, n_x, n_y, 0]
    # Siemens puts the mosaic's position at the corner of the whole tiled image, not of slice 0:
    # (mosaic size - slice size) / 2 pixels before it along rows and columns (nibabel's dicom_mosaic notes)
    shift_rows, shift_columns = (tiles - 1) * n_y / 2, (tiles - 1) * n_x / 2
    corner_3 = (geometry.positions_k3[0] - geometry.column_cosine_3 * geometry.pixel_spacing[0] * shift_rows
                - geometry.row_cosine_3 * geometry.pixel_spacing[1] * shift_columns)
    dataset.ImagePositionPatient = [round(float(v), 6) for v in corner_3]
    normal_3 = np.cross(geometry.row_cosine_3, geometry.column_cosine_3)
    dataset.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
    dataset.add_new((0x0019, 0x100A), "US", n_z)  # NumberOfImagesInMosaic
    dataset.add_new((0x0029, 0x0010), "LO", "SIEMENS CSA HEADER")
    dataset.add_new((0x0029, 0x1010), "OB", _csa2({
        "NumberOfImagesInMosaic": ("US", [str(n_z)]),
        "SliceNormalVector": ("FD", [f"{v:.8f}" for v in normal_3]),
        "AcquisitionMatrixText": ("SH", [f"{n_y}p*{n_x}"]),
    }))
    dataset.add_new((0x0029, 0x1020), "OB", _csa2({"MrPhoenixProtocol": ("UN", [_ascconv(geometry, n_x, n_y)])}))
    dataset.PixelData = mosaic_yx.tobytes()
    return _dicom_bytes(dataset)


def _enhanced_bytes(volume_xyz: np.ndarray, affine: np.ndarray, info: SeriesInfo, index: int,
                    acquired: datetime.datetime) -> bytes:
    def item(**fields) -> pydicom.Dataset:
        dataset = pydicom.Dataset()
        for key, value in fields.items():
            setattr(dataset, key, value)
        return dataset

    n_x, n_y, n_z = volume_xyz.shape
    geometry = SliceGeometry.of(affine, n_z)
    dataset = _base_dataset(info, index, acquired, ENHANCED_MR, n_y, n_x)
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    dataset.NumberOfFrames = n_z
    organisation_uid = generate_uid(UID_ROOT, entropy_srcs=[info.series_uid, "dimensions"])
    dataset.DimensionOrganizationSequence = Sequence([item(DimensionOrganizationUID=organisation_uid)])
    dataset.DimensionIndexSequence = Sequence([
        item(DimensionIndexPointer=0x00209056, FunctionalGroupPointer=0x00209111),  # StackID
        item(DimensionIndexPointer=0x00209057, FunctionalGroupPointer=0x00209111)])  # InStackPositionNumber
    dataset.SharedFunctionalGroupsSequence = Sequence([item(
        PixelMeasuresSequence=Sequence([item(PixelSpacing=list(geometry.pixel_spacing),
                                             SliceThickness=geometry.slice_spacing,
                                             SpacingBetweenSlices=geometry.slice_spacing)]),
        PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=geometry.orientation)]),
        MRTimingAndRelatedParametersSequence=Sequence([item(RepetitionTime=round(info.tr_s * 1000.0, 6))]),
        PixelValueTransformationSequence=Sequence([item(RescaleIntercept=0, RescaleSlope=1, RescaleType="US")]))])
    dataset.PerFrameFunctionalGroupsSequence = Sequence([item(
        FrameContentSequence=Sequence([item(StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1],
                                            FrameAcquisitionNumber=index + 1,
                                            FrameAcquisitionDateTime=dataset.AcquisitionDateTime)]),
        PlanePositionSequence=Sequence([item(ImagePositionPatient=[round(float(v), 6) for v in position_3])]))
        for k, position_3 in enumerate(geometry.positions_k3)])
    dataset.PixelData = geometry.slices_kyx(volume_xyz).tobytes()
    return _dicom_bytes(dataset)


def _slice_files(volume_xyz: np.ndarray, affine: np.ndarray, info: SeriesInfo, index: int,
                 acquired: datetime.datetime) -> list[tuple[str, bytes]]:
    """Classic MR Image Storage, one file per slice: the volume's acquisition number is shared, the
    instance number runs through the series, ImagesInAcquisition says how many slices make the volume."""
    n_x, n_y, n_z = volume_xyz.shape
    geometry = SliceGeometry.of(affine, n_z)
    files = []
    for k, (slice_yx, position_3) in enumerate(zip(geometry.slices_kyx(volume_xyz), geometry.positions_k3)):
        dataset = _base_dataset(info, index, acquired, MR_IMAGE, n_y, n_x)
        dataset.InstanceNumber = index * n_z + k + 1
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            UID_ROOT, entropy_srcs=[info.series_uid, str(index), str(k)])
        dataset.ImagesInAcquisition = n_z
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        dataset.ImageOrientationPatient = geometry.orientation
        dataset.ImagePositionPatient = [round(float(v), 6) for v in position_3]
        dataset.PixelSpacing = list(geometry.pixel_spacing)
        dataset.SliceThickness = dataset.SpacingBetweenSlices = geometry.slice_spacing
        dataset.SliceLocation = round(float(position_3 @ np.cross(geometry.row_cosine_3, geometry.column_cosine_3)), 6)
        dataset.PixelData = slice_yx.tobytes()
        files.append((_file_name(info, dataset.InstanceNumber, "slices"), _dicom_bytes(dataset)))
    return files


def _dicom_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _csa2(tags: dict[str, tuple[str, list[str]]]) -> bytes:
    """A Siemens CSA2 header ("SV10"): per tag its name, VR and items, each item a 0-terminated string
    padded to 4 bytes (the layout nibabel.nicom.csareader reads)."""
    out = bytearray(b"SV10\x04\x03\x02\x01" + struct.pack("<2I", len(tags), CSA_CHECK))
    for name, (vr, values) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 0, len(values), CSA_CHECK)
        for value in values:
            data = value.encode("latin-1") + b"\0"
            out += struct.pack("<4i", len(data), len(data), CSA_CHECK, len(data)) + data + b"\0" * (-len(data) % 4)
    return bytes(out)


def _ascconv(geometry: SliceGeometry, n_x: int, n_y: int) -> str:
    """The protocol's slice list (ASCCONV), the part of the series header dicom2nifti reads for mosaics."""
    centres_k3 = (geometry.positions_k3 + geometry.row_cosine_3 * geometry.pixel_spacing[1] * (n_x - 1) / 2
                  + geometry.column_cosine_3 * geometry.pixel_spacing[0] * (n_y - 1) / 2)
    lines = ["### ASCCONV BEGIN ###", f"sSliceArray.lSize\t = {len(centres_k3)}"]
    for k, (sag, cor, tra) in enumerate(centres_k3):
        lines += [f"sSliceArray.asSlice[{k}].sPosition.dSag\t = {sag:.6f}",
                  f"sSliceArray.asSlice[{k}].sPosition.dCor\t = {cor:.6f}",
                  f"sSliceArray.asSlice[{k}].sPosition.dTra\t = {tra:.6f}"]
    return "\n".join(lines + ["### ASCCONV END ###"])


def _seconds_of_day(moment: datetime.datetime) -> float:
    return moment.hour * 3600 + moment.minute * 60 + moment.second + moment.microsecond / 1e6
