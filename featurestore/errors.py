"""The project's exceptions: one base class, one subclass per kind of failure.

Every message names the bad value, where it came from, and what to do about it.
The CLI maps each class to an exit code, so scripts can tell failures apart.
"""
from __future__ import annotations

__all__ = [
    "FeatureStoreError", "ConfigError", "StoreVersionError", "NotFoundError",
    "DatasetError", "BadItemError", "BackboneError", "IntegrityError", "LockedError",
    "DiskFullError", "InputReadError",
]


class FeatureStoreError(Exception):
    """Base class of every error this project raises on purpose."""

    exit_code = 1


class ConfigError(FeatureStoreError, ValueError):
    """A bad option, parameter or configuration value."""

    exit_code = 2


class StoreVersionError(FeatureStoreError):
    """The store on disk was written by an incompatible format version."""

    exit_code = 3


class NotFoundError(FeatureStoreError, KeyError):
    """A named thing (dataset, backbone, fingerprint, run) does not exist."""

    exit_code = 4

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DatasetError(FeatureStoreError):
    """A dataset manifest or layout that cannot be used as given."""

    exit_code = 5


class BadItemError(FeatureStoreError):
    """One input item cannot be decoded; extraction records it and goes on."""

    exit_code = 6


class InputReadError(DatasetError):
    """A dataset's files cannot be read right now (an I/O error, a missing mount, too many open files):
    not the item's fault, so extraction stops without recording it and a rerun retries."""


class BackboneError(FeatureStoreError):
    """A backbone that cannot be loaded or run."""

    exit_code = 7


class IntegrityError(FeatureStoreError):
    """Stored data does not match its checksum, its manifest or its spec."""

    exit_code = 8


class LockedError(FeatureStoreError):
    """Another process holds the lock of a feature set."""

    exit_code = 9


class DiskFullError(FeatureStoreError):
    """The disk (or quota) is full: nothing half-written is left, what was published is kept."""

    exit_code = 11
