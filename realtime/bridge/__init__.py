"""The scanner bridge (mindeye-bridge): watches the scanner's export folder, reads DICOM / NIfTI volumes,
corrects head motion, resamples into the model's grid and sends the volumes over the wire protocol.
It imports the core (mindeye/) only, never another stage."""
