"""The live web viewer: a browser page of the decoded trials, fed in-process (`LiveViewer.show`) or, run as
`mindeye-viewer`, from the service's result stream on another machine."""
from realtime.viewer.server import LiveViewer

__all__ = ["LiveViewer"]
