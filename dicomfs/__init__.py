"""dicomfs: mount a DICOMweb server as a read-only folder of DICOM files."""

__version__ = "0.1.0"
