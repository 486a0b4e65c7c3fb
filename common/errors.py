"""Errors shared by every role.

    CicadaError
    ├── PackageError          a model package is missing, malformed or does not match its model
    │   ├── PackageFormatError    manifest unreadable, unknown/newer format version, bad field
    │   ├── PackageIntegrityError a file's size, hash or a stage checksum does not match
    │   └── PackageMismatchError  a tensor is missing, extra, or has the wrong shape/dtype
    └── StagingError          a model's stages cannot be determined as declared

Every message names the file or tensor at fault and, where there is one, the next step.
"""

from __future__ import annotations


class CicadaError(Exception):
    """Base of every error Cicada raises on purpose."""


class PackageError(CicadaError):
    """A model package cannot be used as it is."""


class PackageFormatError(PackageError):
    """The manifest is unreadable, malformed, or from a newer format."""


class PackageIntegrityError(PackageError):
    """Bytes on disk differ from what the manifest recorded."""


class PackageMismatchError(PackageError):
    """The package and the model it names disagree on a tensor."""


class StagingError(CicadaError):
    """A model's declared stages are inconsistent."""
