"""Where every NSD file lives, by its real path (NSD data manual; MindEye2's release).

One `NSDLayout` serves real NSD and the synthetic world alike: the world writes the very
same tree, so switching a command from the world to NSD is one config value (the root).
Subjects, sessions and runs are 1-based, as in NSD's file names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mindeye.errors import ConfigValueError, MissingFileError


def subject_name(subject: int) -> str:
    """NSD's name for a subject number: 1 -> 'subj01'."""
    if not 1 <= subject <= 99:
        raise ConfigValueError(f"subject numbers are 1-based, got {subject}")
    return f"subj{subject:02d}"


@dataclass(frozen=True)
class NSDLayout:
    """The NSD directory tree under `root` (the folder holding nsddata/, nsddata_betas/, ...).

    `mindeye_root` is where MindEye2's released hdf5 files are (default: root/mindeyev2).
    """

    root: Path
    resolution: str = "func1pt8mm"
    betas_version: str = "betas_fithrf_GLMdenoise_RR"
    mindeye_root: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.mindeye_root is None:
            object.__setattr__(self, "mindeye_root", self.root / "mindeyev2")
        else:
            object.__setattr__(self, "mindeye_root", Path(self.mindeye_root))

    # -- nsddata: design, ROIs ------------------------------------------------------------
    def expdesign(self) -> Path:
        return self.root / "nsddata/experiments/nsd/nsd_expdesign.mat"

    def roi(self, subject: int, name: str = "nsdgeneral") -> Path:
        return self.root / f"nsddata/ppdata/{subject_name(subject)}/{self.resolution}/roi/{name}.nii.gz"

    def brainmask(self, subject: int) -> Path:
        return self.root / f"nsddata/ppdata/{subject_name(subject)}/{self.resolution}/brainmask.nii.gz"

    # -- nsddata_timeseries: pre-processed runs and their design ---------------------------
    def _timeseries_dir(self, subject: int) -> Path:
        return self.root / f"nsddata_timeseries/ppdata/{subject_name(subject)}/{self.resolution}"

    def timeseries(self, subject: int, session: int, run: int) -> Path:
        return self._timeseries_dir(subject) / f"timeseries/timeseries_session{session:02d}_run{run:02d}.nii.gz"

    def design(self, subject: int, session: int, run: int) -> Path:
        return self._timeseries_dir(subject) / f"design/design_session{session:02d}_run{run:02d}.tsv"

    # -- nsddata_betas: single-trial betas --------------------------------------------------
    def betas(self, subject: int, session: int) -> Path:
        return (self.root / f"nsddata_betas/ppdata/{subject_name(subject)}/{self.resolution}"
                / f"{self.betas_version}/betas_session{session:02d}.nii.gz")

    # -- nsddata_stimuli --------------------------------------------------------------------
    def stimuli(self) -> Path:
        return self.root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"

    # -- MindEye2's release -----------------------------------------------------------------
    def mindeye_betas(self, subject: int) -> Path:
        return self.mindeye_root / f"betas_all_{subject_name(subject)}_fp32_renorm.hdf5"

    def mindeye_images(self) -> Path:
        return self.mindeye_root / "coco_images_224_float16.hdf5"

    # -- presence -----------------------------------------------------------------------------
    def require(self, path: Path, what: str) -> Path:
        """Return `path` if it exists, else raise MissingFileError naming `what` it is."""
        if not path.is_file():
            raise MissingFileError(path, what, hint=f"NSD root is {self.root}")
        return path
