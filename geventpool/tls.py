"""TLS for every connection geventpool opens or accepts, cooperative with or without gevent's
monkey-patching.

:class:`ClientTls` and :class:`ServerTls` are values (files, a key password, verification
choices, or a ready :class:`ssl.SSLContext`); each builds its context once, when it is made, so
a missing or wrong file is a :class:`~geventpool.errors.ConfigurationError` before anything
starts. :func:`handshake` wraps a gevent socket with any context, the standard library's
included, as a gevent TLS socket (so the handshake and every later read and write yield to the
hub instead of blocking it) and bounds the handshake by a timeout. A failed handshake is a
:class:`TlsError` that says why and whose fault it is: the peer's (a certificate that does not
verify, a host name that does not match, a peer that speaks no TLS, no answer in time) or ours
(the peer refused our certificate, which every instance would refuse alike).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.ssl

from geventpool.errors import ConfigurationError, TlsError
from geventpool.secret import Secret
from geventpool.validation import check_seconds

# Alerts a peer sends when it refuses OUR certificate (OpenSSL's reason codes): a fault of our
# credential, not of the instance, which any instance would refuse alike.
_REFUSED_OUR_CERTIFICATE = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)


def refused_our_certificate(peer: str, error: BaseException) -> TlsError | None:
    """``error`` (seen on a connection after its handshake) as the :class:`TlsError` it is
    when the peer refused our certificate, else None. With TLS 1.3 a server checks the
    client's certificate after the client's handshake has ended, so its refusal arrives at
    the first read; it also means the server read no request (nothing ran)."""
    if isinstance(error, ssl.SSLError) and error.reason in _REFUSED_OUR_CERTIFICATE:
        reason = f"the peer refused this side's certificate ({error.reason})"
        return TlsError(peer, reason, peer_at_fault=False)
    return None


def cooperative_context(
    purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH, ca_file: str | None = None
) -> ssl.SSLContext:
    """A context like :func:`ssl.create_default_context` (TLS 1.2 or later; for
    ``SERVER_AUTH`` certificates verified and host names checked), whose ``wrap_socket``
    makes gevent TLS sockets: the standard library's clients (``smtplib``, ``http.client``)
    given it do their TLS without blocking the hub."""
    client = purpose == ssl.Purpose.SERVER_AUTH
    context: ssl.SSLContext = gevent.ssl.SSLContext(
        ssl.PROTOCOL_TLS_CLIENT if client else ssl.PROTOCOL_TLS_SERVER
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    elif client:
        context.load_default_certs(purpose)
    return context


def _check_file(path: str | None, what: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise ConfigurationError(f"tls {what} {path!r} is not a readable file")


def _password(secret: Secret | None) -> str | None:
    return None if secret is None else secret.reveal()


@dataclass(frozen=True)
class ClientTls:
    """How a client speaks TLS to instances (and to ZooKeeper).

    ``ca_file`` holds the certificates that may sign an instance's certificate (default: the
    system's); ``cert_file``/``key_file`` (and ``key_password``) are this client's own
    certificate for mutual TLS; ``verify`` False accepts any certificate (never in production);
    ``check_hostname`` matches the certificate against the host the registry names, or against
    ``server_name`` when all instances share one name. ``context`` replaces all the files: a
    ready :class:`ssl.SSLContext` used as it is. ``plaintext`` decides what happens with an
    instance the registry lists without TLS: ``False`` (default) refuses it, since configuring
    TLS means no call goes out in plaintext; ``True`` calls it in plaintext. An instance that
    offers TLS is always called over TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: Secret | None = field(default=None, repr=False)
    verify: bool = True
    check_hostname: bool = True
    server_name: str | None = None
    context: ssl.SSLContext | None = field(default=None, compare=False)
    plaintext: bool = False
    _built: ssl.SSLContext = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_built", self.context or self._build())

    def _build(self) -> ssl.SSLContext:
        _check_file(self.ca_file, "ca_file")
        _check_file(self.cert_file, "cert_file")
        _check_file(self.key_file, "key_file")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigurationError("tls key_file needs cert_file")
        if self.check_hostname and not self.verify:
            raise ConfigurationError("tls check_hostname needs verify (set both False)")
        try:
            context = cooperative_context(ssl.Purpose.SERVER_AUTH, self.ca_file)
            context.check_hostname = self.check_hostname
            if not self.verify:
                context.verify_mode = ssl.CERT_NONE
            if self.cert_file is not None:
                context.load_cert_chain(
                    self.cert_file, self.key_file, password=_password(self.key_password)
                )
        except (ssl.SSLError, OSError, ValueError) as error:
            raise ConfigurationError(f"tls: cannot load the client's files: {error}") from None
        return context

    def ssl_context(self) -> ssl.SSLContext:
        """The context every client connection is wrapped with (built once)."""
        return self._built

    def hostname_for(self, host: str) -> str | None:
        """The name the peer's certificate must carry (None: no host name check)."""
        if not self._built.check_hostname:
            return None
        return self.server_name or host


@dataclass(frozen=True)
class ServerTls:
    """How a server speaks TLS: its certificate chain ``cert_file`` and ``key_file`` (and
    ``key_password``); ``ca_file`` the certificates that may sign a client's certificate;
    ``require_client_cert`` (default: True when ``ca_file`` is given) makes every client
    present one that verifies (mutual TLS). ``context`` replaces all of it.
    ``handshake_timeout`` bounds each connection's handshake (a client that connects and
    says nothing holds its slot no longer)."""

    cert_file: str | None = None
    key_file: str | None = None
    key_password: Secret | None = field(default=None, repr=False)
    ca_file: str | None = None
    require_client_cert: bool | None = None
    context: ssl.SSLContext | None = field(default=None, compare=False)
    handshake_timeout: float = 10.0
    _built: ssl.SSLContext = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_seconds("handshake_timeout", self.handshake_timeout)
        object.__setattr__(self, "_built", self.context or self._build())

    def _build(self) -> ssl.SSLContext:
        if self.cert_file is None:
            raise ConfigurationError("server tls needs cert_file (or a context)")
        _check_file(self.cert_file, "cert_file")
        _check_file(self.key_file, "key_file")
        _check_file(self.ca_file, "ca_file")
        require = self.require_client_cert
        if require is None:
            require = self.ca_file is not None
        if require and self.ca_file is None:
            raise ConfigurationError("server tls require_client_cert needs ca_file")
        try:
            context = cooperative_context(ssl.Purpose.CLIENT_AUTH, self.ca_file)
            context.load_cert_chain(
                self.cert_file, self.key_file, password=_password(self.key_password)
            )
        except (ssl.SSLError, OSError, ValueError) as error:
            raise ConfigurationError(f"tls: cannot load the server's files: {error}") from None
        context.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_NONE
        return context

    def ssl_context(self) -> ssl.SSLContext:
        """The context every accepted connection is wrapped with (built once)."""
        return self._built


def _late(timeout: float) -> str:
    return f"no handshake within {timeout:.3f}s"


def handshake(
    sock: Any,
    context: ssl.SSLContext,
    peer: str,
    timeout: float,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
) -> gevent.ssl.SSLSocket:
    """``sock`` (a gevent socket) wrapped as a gevent TLS socket by ``context`` (any
    :class:`ssl.SSLContext`), its handshake done within ``timeout`` seconds. On failure the
    socket is closed and :class:`TlsError` names ``peer`` and the reason."""
    try:
        # gevent's own SSLContext.wrap_socket builds exactly this; building it here lets a
        # standard library context (a user's) make cooperative sockets too.
        tls = gevent.ssl.SSLSocket(
            sock=sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            server_hostname=server_hostname,
            _context=context,
        )
    except (OSError, ValueError) as error:
        sock.close()
        raise TlsError(peer, f"{error}") from None
    # one timer for the whole handshake: a socket timeout bounds each wait only, and a peer
    # that sends a byte at a time would reset it at every byte
    timer = gevent.Timeout(timeout)
    timer.start()
    try:
        tls.settimeout(timeout)
        tls.do_handshake()
        tls.settimeout(None)
        return tls
    except gevent.Timeout as fired:
        if fired is not timer:
            tls.close()
            raise
        reason, at_fault = _late(timeout), True
    except ssl.SSLCertVerificationError as error:
        reason, at_fault = f"the peer's certificate: {error.verify_message}", True
    except ssl.SSLError as error:
        code = getattr(error, "reason", None) or ""
        at_fault = code not in _REFUSED_OUR_CERTIFICATE
        if not code:  # gevent's own handshake timeout, and errors without an OpenSSL reason
            reason = str(error) if "timed out" not in str(error) else _late(timeout)
        elif at_fault:
            reason = code
        else:
            reason = f"the peer refused this side's certificate ({code})"
    except TimeoutError:
        reason, at_fault = _late(timeout), True
    except OSError as error:
        reason, at_fault = f"{error!r}", True
    finally:
        timer.close()
    tls.close()
    raise TlsError(peer, reason, peer_at_fault=at_fault)
