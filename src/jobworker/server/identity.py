"""Who calls: the identity in the peer's own certificate, checked; revocation by tls.crl."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc import aio

from jobworker.errors import ConfigError, PermissionDenied, ResourceExhausted, Unauthenticated
from jobworker.model import Caller
from jobworker.units import shorten

log = structlog.get_logger("jobworker.server")

_TLS_VERSIONS = (b"TLS1_3", b"TLSv1.3", b"TLS1_2", b"TLSv1.2")


@dataclass(frozen=True, slots=True)
class Peer:
    """The identity (the certificate's one common name) and the certificate's serial."""

    identity: str
    serial: int


def peer_of(auth: Mapping[str, Iterable[bytes]]) -> Peer:
    """The checked identity of a call's auth context; Unauthenticated when there is none.

    From the certificate's PEM, not grpc's x509_common_name: that one is a C string
    (a CN "admin\\0x" reads "admin") and the first of several CNs."""
    version = next(iter(auth.get("ssl_tls_version") or [b""]))
    if version and version not in _TLS_VERSIONS:
        raise Unauthenticated(f"TLS version {version.decode(errors='replace')} is not accepted")
    pems = list(auth.get("x509_pem_cert") or [])
    if not pems:
        raise Unauthenticated("no client certificate")
    found = _parse(pems[0])
    if isinstance(found, str):
        raise Unauthenticated(found)
    return found


@functools.lru_cache(maxsize=256)  # one parse per certificate, not per call
def _parse(pem: bytes) -> Peer | str:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        # cryptography decodes the subject when it is first read: a bad encoding fails here.
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        return f"the client certificate cannot be read: {exc}"
    if len(names) != 1:
        return (
            "the client certificate's subject must have exactly one common name "
            f"(the identity); it has {len(names)}"
        )
    value = names[0].value
    name = value if isinstance(value, str) else value.decode(errors="replace")
    if not name or not name.isprintable():
        return (
            f"the client certificate's common name {shorten(repr(name), 100)} is empty or "
            "holds a NUL or control character"
        )
    return Peer(name, cert.serial_number)


class Revocations:
    """The serials revoked by tls.crl: a PEM CRL signed by the CA of tls.ca_cert.

    Re-read when the file changes (refresh) or the config names another (configure); a CRL
    that cannot be read, or that the CA did not sign, is refused with a log line and the
    one in force kept. At start there is none to keep: a bad CRL stops the start."""

    def __init__(self, path: Path | None, ca_path: Path) -> None:
        self.path, self.ca_path = path, ca_path
        self._stamp = self._file_stamp()
        self.serials: frozenset[int] = frozenset()
        try:
            self.serials = self._load()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[tls] crl: {exc}") from None

    def revoked(self, serial: int) -> bool:
        """True when the certificate of this serial is revoked."""
        return serial in self.serials

    def configure(self, path: Path | None, ca_path: Path) -> bool:
        """Follow a reloaded [tls]; True when the revoked serials changed."""
        if (path, ca_path) == (self.path, self.ca_path):
            return self.refresh()
        # The new file is the one watched from now on, even when refused: fixing it is seen.
        self.path, self.ca_path = path, ca_path
        return self.refresh(force=True)

    def refresh(self, *, force: bool = False) -> bool:
        """Read the CRL again if its file changed; True when the revoked serials changed."""
        stamp = self._file_stamp()
        if stamp == self._stamp and not force:
            return False
        try:
            serials = self._load()
        except (OSError, ValueError) as exc:
            self._stamp = stamp  # logged once per change of the file, not at every look
            log.error(
                "crl_refused",
                crl=str(self.path),
                error=str(exc),
                message="the revocation list in force is kept",
                revoked=len(self.serials),
            )
            return False
        self._stamp = stamp
        changed = serials != self.serials
        self.serials = serials
        log.info("crl_loaded", crl=str(self.path), revoked=len(serials))
        return changed

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return (0, 0, -1)  # missing: a change too, refused by _load
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self) -> frozenset[int]:
        if self.path is None:
            return frozenset()
        crl = x509.load_pem_x509_crl(self.path.read_bytes())
        cas = x509.load_pem_x509_certificates(self.ca_path.read_bytes())
        if not any(crl.issuer == ca.subject and _signed_by(crl, ca) for ca in cas):
            raise ValueError(f"{self.path} is not signed by the CA in {self.ca_path}")
        return frozenset(entry.serial_number for entry in crl)


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key: Any = ca.public_key()
    try:
        return crl.is_signature_valid(key)
    except TypeError:  # a key type a CRL cannot be signed with
        return False


_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller")


def current_caller() -> Caller:
    """The caller of the RPC being served (set by Identities.caller)."""
    return _caller.get()


@dataclass(slots=True, eq=False)
class OpenCall:
    """A streaming call in progress, which a reload or a revocation may end."""

    method: str
    peer: Peer
    task: asyncio.Task[Any]
    receiving: bool = True  # an upload that still reads; a follower always is
    ending: tuple[grpc.StatusCode, str] | None = None


class Identities:
    """Who calls, and with which role; ends open calls whose right was taken away."""

    def __init__(self, role_of: Callable[[str], str], revocations: Revocations | None) -> None:
        self.role_of = role_of  # reads the live config: roles change without a restart
        self.revocations = revocations
        self.open: set[OpenCall] = set()

    def peer(self, context: aio.ServicerContext[Any, Any]) -> Peer:
        """The call's checked peer; Unauthenticated when its certificate is revoked."""
        peer = peer_of(context.auth_context())
        if self.revocations is not None:
            if self.revocations.refresh():  # a stat: `certs revoke` counts from the next call
                self.recheck()
            if self.revocations.revoked(peer.serial):
                raise Unauthenticated(
                    f"the client certificate of {shorten(repr(peer.identity), 100)} "
                    f"(serial {peer.serial:x}) is revoked"
                )
        return peer

    def caller(self, peer: Peer) -> Caller:
        """The caller of this call (current_caller() from now on); role none is refused."""
        role = self.role_of(peer.identity)
        if role == "none":
            raise PermissionDenied(f"identity {shorten(repr(peer.identity), 100)} has role 'none'")
        caller = Caller(peer.identity, role)
        _caller.set(caller)
        return caller

    def refusal(self, call: OpenCall) -> tuple[grpc.StatusCode, str] | None:
        """Why an open call may go on no longer (its role taken away, its certificate
        revoked), or None."""
        who = shorten(repr(call.peer.identity), 100)
        if self.revocations is not None and self.revocations.revoked(call.peer.serial):
            return grpc.StatusCode.UNAUTHENTICATED, f"the client certificate of {who} is revoked"
        role = self.role_of(call.peer.identity)
        if role == "none":
            return grpc.StatusCode.PERMISSION_DENIED, f"identity {who} now has role 'none'"
        if call.method == "ScheduleBatch" and not Caller(call.peer.identity, role).can_schedule:
            return grpc.StatusCode.PERMISSION_DENIED, f"role {role!r} of {who} may not schedule"
        return None

    def recheck(self) -> int:
        """End the open calls that may go on no longer (after a reload); how many."""
        ended = 0
        for call in list(self.open):
            if call.ending is None and call.receiving and (why := self.refusal(call)):
                call.ending = why
                call.task.cancel()
                ended += 1
        return ended

    @contextlib.contextmanager
    def opened(self, method: str, peer: Peer) -> Iterator[OpenCall]:
        """The current task as an open call of `peer` while inside."""
        call = OpenCall(method, peer, asyncio.current_task())  # type: ignore[arg-type]
        self.open.add(call)
        try:
            yield call
        finally:
            self.open.discard(call)


class PerIdentity:
    """Calls of each identity in flight, held against a per-identity cap."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, identity: str, limit: int, refusal: str) -> Iterator[None]:
        """One more call of `identity` while inside; RESOURCE_EXHAUSTED(`refusal`) when it
        already has `limit` (0: no cap)."""
        count = self.counts.get(identity, 0)
        if limit and count >= limit:
            raise ResourceExhausted(refusal)
        self.counts[identity] = count + 1
        try:
            yield
        finally:
            left = self.counts[identity] - 1
            if left:
                self.counts[identity] = left
            else:
                del self.counts[identity]
