"""The package version, in a leaf module that writers of files (checkpoints, exports) can import."""

__version__ = "0.1.0"
