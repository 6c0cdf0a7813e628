"""The bridge's file reader on real files no one here wrote (pydicom's and nibabel's test data), checked
against dicom2nifti's and nibabel's own conversions of the same files; and on files cut short or garbage."""
from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from realtime.bridge.scanner_files import CorruptFile, IncompleteFile, probe, read_volume
from mindeye.errors import FormatError

NIBABEL_DICOM = Path(nib.__file__).parent / "nicom" / "tests" / "data"
PYDICOM_FILES = Path(get_testdata_file("MR_small.dcm")).parent
CT_SERIES = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"  # 5 CT slices, one file each


def _copy(sources, folder: Path) -> list[Path]:
    """Copies (gunzipped) of real test files in their own folder, as dicom2nifti reads a folder."""
    folder.mkdir()
    paths = []
    for source in map(Path, sources):
        path = folder / source.name.removesuffix(".gz")
        path.write_bytes(gzip.open(source).read() if source.suffix == ".gz" else source.read_bytes())
        paths.append(path)
    return paths


def _reoriented_like(volume, affine_44: np.ndarray) -> nib.Nifti1Image:
    """`volume` with its axes permuted / flipped to the orientation of `affine_44` (same world samples)."""
    image = nib.Nifti1Image(volume.data_xyz, volume.affine)
    return image.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(volume.affine),
                                                               nib.io_orientation(affine_44)))


def _dicom2nifti(folder: Path) -> nib.Nifti1Image:
    import dicom2nifti

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dicom2nifti.dicom_series_to_nifti(str(folder), str(folder / "dicom2nifti.nii.gz"),
                                                   reorient_nifti=False)
    return nib.load(result["NII_FILE"])


@pytest.mark.filterwarnings("ignore:Unable to find Philips private scale factor")
@pytest.mark.parametrize("name, sources, shape", [
    ("siemens mosaic", [NIBABEL_DICOM / "siemens_dwi_0.dcm.gz"], (128, 128, 48)),
    ("philips enhanced multi-frame", [NIBABEL_DICOM / "philips_mprage.dcm.gz"], (256, 256, 176)),
    ("one CT slice per file", sorted(CT_SERIES.iterdir()), (16, 16, 5)),
])
def test_real_files_match_dicom2nifti(tmp_path, name, sources, shape):
    paths = _copy(sources, tmp_path / "series")
    volume = read_volume(paths[::-1])  # the file order given must not matter
    assert volume.data_xyz.shape == shape and volume.data_xyz.dtype == np.float32
    theirs = _dicom2nifti(tmp_path / "series")
    theirs_xyz = np.asanyarray(theirs.dataobj).astype(np.float32).reshape(shape)
    ours = _reoriented_like(volume, theirs.affine)
    np.testing.assert_array_equal(np.asanyarray(ours.dataobj), theirs_xyz)
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=2e-3)  # mm; the Philips file's cosines are rounded


def test_real_mosaic_matches_nibabel_mosaic_reader_and_its_header(tmp_path):
    (path,) = _copy([NIBABEL_DICOM / "siemens_dwi_1000.dcm.gz"], tmp_path / "series")
    volume = read_volume(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pydicom
        from nibabel.nicom.dicomreaders import mosaic_to_nii
        reference = mosaic_to_nii(pydicom.dcmread(path))
    np.testing.assert_array_equal(volume.data_xyz, np.asanyarray(reference.dataobj))
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-6)
    key = probe(path)
    assert (key.series_number, key.index, key.parts_expected) == (volume.series_number, volume.index, 1)
    assert volume.tr_s == pytest.approx(6.6)  # RepetitionTime 6600 ms in the header
    assert volume.acquired_s == pytest.approx(20 * 3600 + 29 * 60 + 59.9, abs=60)  # AcquisitionTime 20:29:.. in it


def test_slices_of_a_series_are_keyed_by_instance_and_stacked_by_position():
    import pydicom

    paths = sorted(CT_SERIES.iterdir())
    keys = [probe(path) for path in paths]
    assert len({key.series_uid for key in keys}) == 1
    # a volume is an acquisition: this CT's slices came in two (fMRI slices: one acquisition per volume)
    assert [key.index for key in keys] == [int(pydicom.dcmread(path).AcquisitionNumber) - 1 for path in paths]
    assert sorted(key.slice_or_part for key in keys) == [6, 7, 8, 9, 10]
    volume = read_volume(paths)
    # slices 2.5 mm apart along z, ascending: the affine's third column is the step between neighbours
    np.testing.assert_allclose(volume.affine[:3, 2], [0, 0, -2.5], atol=1e-4)


def test_a_volume_with_a_slice_missing_is_refused(tmp_path):
    paths = sorted(CT_SERIES.iterdir(), key=lambda path: probe(path).slice_or_part)
    with pytest.raises(FormatError, match="evenly spaced"):
        read_volume(paths[:2] + paths[3:])


# ---- files cut short and garbage ------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 100, 600, 0.5, -1])
def test_a_dicom_cut_short_is_incomplete(tmp_path, keep):
    raw = get_testdata_file("MR_small.dcm", read=False)
    data = Path(raw).read_bytes()
    cut = tmp_path / "001_000001_000001.dcm"
    cut.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep if keep >= 0 else len(data) - 200])
    for reader in (probe, read_volume):
        with pytest.raises(IncompleteFile) as caught:
            reader(cut)
        assert str(cut) in str(caught.value) and "\n" not in str(caught.value)


def test_pydicoms_truncated_file_is_incomplete_and_the_whole_one_reads():
    with pytest.raises(IncompleteFile, match="pixel bytes"):
        probe(get_testdata_file("MR_truncated.dcm"))
    assert read_volume(get_testdata_file("MR_small.dcm")).data_xyz.shape == (64, 64, 1)


@pytest.mark.parametrize("content, name, found", [
    (b"\x00" * 128 + b"DICM" + bytes(range(256)) * 8, "a.dcm", "file meta information"),
    (b"scanner log line\n" * 20, "b.dcm", "no 'DICM' marker"),
    (b"\x00" * 400, "c.nii", "NIfTI-1 header"),
    (b"not gzip at all" * 30, "d.nii.gz", "not gzip"),
])
def test_garbage_is_corrupt(tmp_path, content, name, found):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorruptFile, match=found) as caught:
        probe(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_dicom_that_is_no_image_is_corrupt_not_incomplete():
    with pytest.raises(CorruptFile, match="not an image"):
        probe(get_testdata_file("test-SR.dcm"))


def test_nifti_cut_short_is_incomplete_whole_it_reads(tmp_path):
    volume_xyz = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = nib.Nifti1Image(volume_xyz, np.diag([2.0, 2.0, 2.5, 1.0]))
    whole = tmp_path / "001_000007_000003.nii.gz"
    nib.save(image, whole)
    volume = read_volume(whole)
    np.testing.assert_array_equal(volume.data_xyz, volume_xyz)
    assert (volume.series_number, volume.index) == (7, 2)
    raw = nib.Nifti1Image(volume_xyz, image.affine).to_bytes()
    for name, data in [("001_000007_000004.nii", raw[:348 + 100]), ("001_000007_000005.nii", raw[:200]),
                       ("001_000007_000006.nii.gz", whole.read_bytes()[:-30])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(IncompleteFile):
            probe(tmp_path / name)
    shutil.rmtree(tmp_path)
