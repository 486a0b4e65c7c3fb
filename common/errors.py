"""Errors shared by every role (torch-free, numpy-free: every role and the SDK import them).

The whole tree, the client's errors included, is drawn once in `cicada.errors`; this module
holds the classes that the roles raise themselves. `cicada.errors` re-exports every one.

Every message names the file, tensor or field at fault and, where there is one, the next step.
"""

from __future__ import annotations


class CicadaError(Exception):
    """Base of every error Cicada raises on purpose."""


# -- model packages ---------------------------------------------------------------------------


class PackageError(CicadaError):
    """A model package cannot be used as it is."""


class PackageFormatError(PackageError):
    """The manifest is unreadable, malformed, or from a newer format."""


class PackageIntegrityError(PackageError):
    """Bytes on disk differ from what the manifest recorded."""


class PackageMismatchError(PackageError):
    """The package and the model it names disagree on a tensor."""


class UntrustedCodeError(PackageError):
    """The package names a factory outside the allow-list, and the operator did not pass
    the trust flag (`--trust-package-code`): its code is not imported."""


class LoadStalledError(PackageError):
    """A stage did not become resident within the load's bound: the forward gives up
    instead of waiting for ever."""


class MissingExtraError(PackageError):
    """An optional library (transformers, torchvision) is not installed."""


class UnknownModelError(PackageError):
    """The library has no model class (transformers) or model (torchvision) of that name."""


class StagingError(CicadaError):
    """A model's declared stages are inconsistent."""


class DeviceError(CicadaError):
    """The accelerator failed (out of memory, a CUDA error): its context may be poisoned, so
    the worker answers UNAVAILABLE and exits for replacement (EXIT_DEVICE_FAILED)."""


# -- the wire and the requests on it ----------------------------------------------------------


class ProtocolError(CicadaError):
    """A frame or message does not follow docs/PROTOCOL.md."""


class EndpointError(CicadaError, ValueError):
    """An endpoint or HOST:PORT that cannot be one (common/endpoints.py says what can).

    Also a ValueError: a bad argument, found before any socket is made."""


class GenerationError(CicadaError, ValueError):
    """The request's generation options or prompt are unusable (answered BAD_REQUEST).

    Also a ValueError, as it was before it joined the tree."""


class InputError(CicadaError, ValueError):
    """Inputs are not what the model takes: dtype, rank, fixed axes, context length or
    vocabulary (checked before the forward, on the edge and the cloud alike). Workers answer
    it with BAD_REQUEST."""


class TextError(CicadaError):
    """Text cannot be turned into model inputs: no tokenizer, a malformed `text` option, or
    text and tensors in one request. Workers answer it with BAD_REQUEST."""


# -- the roles ----------------------------------------------------------------------------------


class ConfigError(CicadaError):
    """The configuration file is missing, not TOML, or has invalid values."""


class LaunchError(CicadaError):
    """A worker could not be started."""


class RegistrationRefused(CicadaError):
    """The coordinator refused this worker's READY (or a HEARTBEAT): a field outside its
    bounds, or a role or model its key is not bound to. The worker must not register again."""

    def __init__(self, refused: str, reason: str) -> None:
        super().__init__(f"the coordinator refused the registration ({refused}): {reason}")
        self.refused = refused
        self.reason = reason


class EdgeModelError(CicadaError):
    """An edge model cannot be loaded, or was given inputs it does not take."""


class EdgeExportError(CicadaError):
    """An edge model cannot be exported as asked (bad source, failed export, failed check)."""
