"""Hilum: a DICOM-native AI node."""

__version__ = "0.1.0"
