"""The NSD data layer: real paths (`NSDLayout`), formats (`files`), and design (`ExpDesign`)."""
from mindeye.nsd.design import ExpDesign, TrialTable, design_vector, onset_volume, task_runs
from mindeye.nsd.files import (RoiMask, StimulusBrick, TimeSeries, read_betas, read_design, read_mindeye_betas,
                               read_roi, read_timeseries)
from mindeye.nsd.layout import NSDLayout, subject_name

__all__ = ["ExpDesign", "NSDLayout", "RoiMask", "StimulusBrick", "TimeSeries", "TrialTable", "design_vector",
           "onset_volume", "read_betas", "read_design", "read_mindeye_betas", "read_roi", "read_timeseries",
           "subject_name", "task_runs"]
