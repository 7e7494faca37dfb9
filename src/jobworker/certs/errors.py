"""The errors of certificate operations."""

from __future__ import annotations

from jobworker.errors import JobWorkerError


class CertsError(JobWorkerError):
    """A certificate operation cannot be done; the message says why and names the file."""


class CertsExist(CertsError):
    """The files to be written exist already and are never overwritten."""


class CaMissing(CertsError):
    """The CA's certificate or key is not in the directory."""


class InvalidCertName(CertsError):
    """A client name or a host name cannot go into a certificate."""
