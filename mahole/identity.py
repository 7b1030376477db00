"""Deployment CA, node certificates and peer verification.

Every mahole node (intermediate, connector, agent) proves an X.509 identity issued by the
deployment CA. A node certificate carries its role and name in a machine-checkable way:

* a subjectAltName URI ``mahole://ROLE/NAME`` (the authoritative identity),
* subject CN = NAME (for people reading the certificate),
* for the intermediate and connectors, a DNS subjectAltName equal to NAME, so that a TLS client
  can use the name as its ``server_name`` and the ordinary hostname check passes,
* one DNS or IP subjectAltName per ``--host`` given at issue time.

Files live in one directory (``certs/`` by default)::

    ca.crt  ca.key          the deployment CA (init_ca)
    NAME.crt  NAME.key      one node (issue)

Private keys are written with mode 0600, atomically (temporary file + rename), so a reader
never sees a half-written key. Every problem a person can cause (missing file, garbage PEM,
wrong CA, expired certificate, wrong role) raises :class:`IdentityError`, a ``ValueError``,
with a message that can be shown as-is.

This module only uses ``cryptography``; it never imports the hot path.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import logging
import os
import re
import secrets
import stat
from typing import Iterable, Sequence, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .wire.control import NAME_RE


class _ChainError(Exception):
    """Internal: chain failure found by the fallback check."""


try:  # cryptography >= 43 can verify client (non-hostname) certificates itself
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    _HAVE_CLIENT_VERIFIER = hasattr(PolicyBuilder, "build_client_verifier")
    _CHAIN_ERRORS: tuple = (_ChainError, VerificationError)
except ImportError:  # pragma: no cover - cryptography < 42
    _HAVE_CLIENT_VERIFIER = False
    _CHAIN_ERRORS = (_ChainError,)

__all__ = [
    "ROLES",
    "URI_SCHEME",
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "IdentityError",
    "Identity",
    "Peer",
    "init_ca",
    "issue",
    "load_identity",
    "load_ca",
    "load_certificate",
    "valid_from",
    "valid_until",
    "verify_peer",
    "role_and_name",
    "check_name",
]

logger = logging.getLogger(__name__)

#: The three kinds of node; a certificate is for exactly one of them.
ROLES = ("intermediate", "connector", "agent")
#: subjectAltName URI prefix carrying ``ROLE/NAME``.
URI_SCHEME = "mahole://"
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"

# A node name is used as a file name and a DNS label, so keep it boring. It must start with a
# letter or digit (no ".", "..", or "-flag" look-alikes).
_NAME_RE = NAME_RE  # node names follow the one grammar of names on the wire and the CLI
# Names that would collide with the CA's files (case-insensitive for such filesystems).
_RESERVED_NAMES = {"ca"}
_HOST_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")
# Backdate notBefore a little so a peer whose clock is slightly behind accepts a fresh cert.
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_ARTICLE = {"intermediate": "an", "agent": "an", "connector": "a"}


class IdentityError(ValueError):
    """A certificate, key or CA problem, with a message fit to show a person."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """This node's own certificate and key, as loaded by :func:`load_identity`.

    For aioquic: ``configuration.certificate = identity.certificate``,
    ``configuration.certificate_chain = identity.chain``,
    ``configuration.private_key = identity.private_key``.
    """

    role: str
    name: str
    certificate: x509.Certificate
    private_key: object  # a cryptography private key object
    cert_pem: bytes  # the leaf certificate, PEM
    chain: list = dataclasses.field(default_factory=list)  # further certificates in the file


@dataclasses.dataclass(frozen=True)
class Peer:
    """A verified remote node (see :func:`verify_peer`)."""

    role: str
    name: str

    def __str__(self) -> str:
        return f"{self.role} {self.name!r}"


# ---------------------------------------------------------------------------------------------
# small helpers


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _as_utc(when) -> datetime.datetime:
    """``None`` → now; a naive datetime is taken as UTC; a number is a POSIX timestamp."""
    if when is None:
        return _utcnow()
    if isinstance(when, (int, float)):
        return datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    if when.tzinfo is None:
        return when.replace(tzinfo=datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc)


def _fmt_time(when: datetime.datetime) -> str:
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def valid_from(cert: x509.Certificate) -> datetime.datetime:
    """The certificate's notBefore, timezone-aware UTC."""
    return cert.not_valid_before_utc


def valid_until(cert: x509.Certificate) -> datetime.datetime:
    """The certificate's notAfter, timezone-aware UTC."""
    return cert.not_valid_after_utc


def _a(role: str) -> str:
    return f"{_ARTICLE.get(role, 'a')} {role}"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid node name, else raise :class:`IdentityError`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise IdentityError(
            f"invalid name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    if name.lower() in _RESERVED_NAMES:
        raise IdentityError(f"invalid name {name!r}: reserved for the CA's own files")
    return name


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise IdentityError(f"invalid role {role!r}: choose one of {', '.join(ROLES)}")
    return role


def _check_days(days) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise IdentityError(f"invalid validity {days!r}: days must be a positive whole number")
    return days


def _host_name(host: str) -> x509.GeneralName:
    """An IP literal becomes an IPAddress SAN, anything else a DNSName SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host) or ".." in host:
        raise IdentityError(f"invalid host {host!r}: give a DNS name or an IP address")
    return x509.DNSName(host.lower())


def _same_public_key(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a same-directory temporary file and a rename.

    The temporary file is created with ``mode`` already applied (never world-readable for
    keys, not even for an instant).
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # umask can only remove bits; make the mode exact
        except (AttributeError, OSError):  # pragma: no cover - platforms without fchmod
            pass
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _is_pem(source) -> bool:
    """Credentials may be given as PEM bytes held in memory instead of a file path."""
    return isinstance(source, (bytes, bytearray, memoryview))


def describe_source(source) -> str:
    """How messages name a credential: its path, or that it came from memory."""
    return "(PEM in memory)" if _is_pem(source) else os.fspath(source)


def _read(path, what: str) -> bytes:
    if _is_pem(path):
        return bytes(path)
    path = os.fspath(path)
    try:
        with open(path, "rb") as fp:
            return fp.read()
    except FileNotFoundError:
        raise IdentityError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise IdentityError(f"{what} file is a directory: {path}") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def _parse_certs(data: bytes, path, what: str) -> list:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise IdentityError(
            f"{what} file {describe_source(path)} does not hold a PEM certificate")
    return certs


def _parse_key(data: bytes, path):
    path = describe_source(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted key and no password
        raise IdentityError(
            f"key file {path} is password-protected; mahole needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityError(f"key file {path} does not hold a PEM private key") from None


def _warn_if_key_readable_by_others(path) -> None:
    if _is_pem(path):
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:  # pragma: no cover
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("key file %s is accessible by other users (mode %o); chmod 600 it",
                       os.fspath(path), stat.S_IMODE(mode))


# ---------------------------------------------------------------------------------------------
# reading the identity out of a certificate


def role_and_name(cert: x509.Certificate) -> tuple:
    """``(role, name)`` from the ``mahole://ROLE/NAME`` subjectAltName URI, *unverified*.

    Raises :class:`IdentityError` if the certificate is not a mahole node certificate.
    """
    not_mahole = "not a mahole certificate (no mahole://ROLE/NAME subjectAltName)"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError(f"certificate is {not_mahole}") from None
    except ValueError as exc:  # extensions are parsed lazily
        raise IdentityError(f"certificate extensions cannot be parsed: {exc}") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.lower().startswith(URI_SCHEME)]
    if not uris:
        raise IdentityError(f"certificate is {not_mahole}")
    if len(uris) > 1:
        raise IdentityError(f"certificate carries several mahole identities: {', '.join(uris)}")
    role, sep, name = uris[0][len(URI_SCHEME):].partition("/")
    if not sep or role not in ROLES or not _NAME_RE.fullmatch(name):
        raise IdentityError(f"certificate has a malformed mahole identity: {uris[0]}")
    return role, name


# ---------------------------------------------------------------------------------------------
# creating


def init_ca(directory, name: str = "mahole deployment CA", days: int = 3650, *,
            force: bool = False) -> tuple:
    """Create the deployment CA: ``DIR/ca.crt`` and ``DIR/ca.key`` (EC P-256, key mode 0600).

    Refuses to replace an existing CA unless ``force`` (replacing it invalidates every
    certificate issued so far). Returns ``(ca_cert_path, ca_key_path)``.
    """
    _check_days(days)
    if not isinstance(name, str) or not name.strip():
        raise IdentityError("the CA name must not be empty")
    directory = os.fspath(directory)
    cert_path = os.path.join(directory, CA_CERT_FILE)
    key_path = os.path.join(directory, CA_KEY_FILE)
    if not force:
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise IdentityError(
                    f"a CA already exists in {directory} ({path}); refusing to overwrite it "
                    "(use --force to replace it and invalidate every certificate it issued)"
                )
    os.makedirs(directory, mode=0o700, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _utcnow()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash in between leaves a key without certificate, never the reverse.
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _load_ca_pair(directory) -> tuple:
    directory = os.fspath(directory)
    cert_path = os.path.join(directory, CA_CERT_FILE)
    key_path = os.path.join(directory, CA_KEY_FILE)
    hint = f"(create one with: python -m mahole certs init --dir {directory})"
    for path in (cert_path, key_path):
        if not os.path.exists(path):
            raise IdentityError(f"no CA in {directory}: {path} not found {hint}")
    ca_cert = _parse_certs(_read(cert_path, "CA certificate"), cert_path, "CA certificate")[0]
    ca_key = _parse_key(_read(key_path, "CA key"), key_path)
    if not _same_public_key(ca_key.public_key(), ca_cert.public_key()):
        raise IdentityError(f"CA key {key_path} does not match CA certificate {cert_path}")
    return ca_cert, ca_key


def _build_leaf(ca_cert, ca_key, role: str, name: str, hosts: Iterable[str], days: int,
                not_before: datetime.datetime | None = None, key=None) -> tuple:
    """Sign a node certificate; returns ``(certificate, private_key)``. No file I/O."""
    _check_role(role)
    check_name(name)
    _check_days(days)
    sans: list = [x509.UniformResourceIdentifier(f"{URI_SCHEME}{role}/{name}")]
    if role in ("intermediate", "connector"):
        sans.append(x509.DNSName(name.lower()))
    for host in hosts:
        general_name = _host_name(host)
        if general_name not in sans:
            sans.append(general_name)

    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    start = _as_utc(not_before) if not_before is not None else _utcnow() - _CLOCK_SKEW
    end = start + datetime.timedelta(days=days)
    if not_before is None:
        end += _CLOCK_SKEW  # the backdating does not eat into the requested lifetime
    end = min(end, valid_until(ca_cert))  # never outlive the CA
    if end <= start:
        raise IdentityError(f"the CA expires on {_fmt_time(valid_until(ca_cert))}; "
                            "create a new CA before issuing certificates")
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def issue(directory, role: str, name: str, hosts: Iterable[str] = (), days: int = 825, *,
          not_before: datetime.datetime | None = None, force: bool = False) -> tuple:
    """Issue a node certificate signed by the CA in ``directory``.

    Writes ``DIR/NAME.crt`` and ``DIR/NAME.key`` (EC P-256, mode 0600) and returns
    ``(cert_path, key_path)``. ``hosts`` adds one IP or DNS subjectAltName each.
    ``not_before`` (default: now minus a few minutes) sets the start of validity, mainly so
    tests can make expired certificates. Refuses to replace an existing certificate or key
    of that name unless ``force``. The validity never extends past the CA's.
    """
    _check_role(role)
    check_name(name)
    hosts = [hosts] if isinstance(hosts, str) else list(hosts)
    directory = os.fspath(directory)
    cert_path = os.path.join(directory, f"{name}.crt")
    key_path = os.path.join(directory, f"{name}.key")
    ca_cert, ca_key = _load_ca_pair(directory)
    if not force:
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise IdentityError(f"{path} already exists; refusing to overwrite it "
                                    "(use --force to replace it)")
    cert, key = _build_leaf(ca_cert, ca_key, role, name, hosts, days, not_before=not_before)
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


# ---------------------------------------------------------------------------------------------
# loading


def load_identity(cert_path, key_path) -> Identity:
    """Load this node's certificate and key, checking they belong together and are mahole's.
    Each is a file path or the PEM bytes themselves."""
    cert_data = _read(cert_path, "certificate")
    key_data = _read(key_path, "key")
    certs = _parse_certs(cert_data, cert_path, "certificate")
    key = _parse_key(key_data, key_path)
    leaf = certs[0]
    if not _same_public_key(key.public_key(), leaf.public_key()):
        raise IdentityError(
            f"key file {describe_source(key_path)} does not match certificate "
            f"{describe_source(cert_path)}"
        )
    try:
        role, name = role_and_name(leaf)
    except IdentityError as exc:
        raise IdentityError(f"{describe_source(cert_path)}: {exc}") from None
    _warn_if_key_readable_by_others(key_path)
    return Identity(
        role=role,
        name=name,
        certificate=leaf,
        private_key=key,
        cert_pem=leaf.public_bytes(serialization.Encoding.PEM),
        chain=certs[1:],
    )


def load_certificate(cert_path) -> x509.Certificate:
    """The first certificate of a PEM file, with :class:`IdentityError` for missing/garbage."""
    return _parse_certs(_read(cert_path, "certificate"), cert_path, "certificate")[0]


def load_ca(ca_path) -> list:
    """The CA certificate(s) in a PEM file or PEM bytes (several are allowed, e.g. during a
    CA rollover)."""
    certs = _parse_certs(_read(ca_path, "CA certificate"), ca_path, "CA certificate")
    for cert in certs:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = bc.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise IdentityError(
                f"{describe_source(ca_path)} holds a certificate that is not a CA "
                f"({cert.subject.rfc4514_string()}); give the deployment's ca.crt"
            )
    return certs


# ---------------------------------------------------------------------------------------------
# verifying


def _manual_chain_check(leaf, intermediates, anchors, when) -> None:
    """Fallback for cryptography without a client verifier: leaf directly issued by an anchor."""
    if intermediates:
        raise _ChainError("intermediate CAs need cryptography >= 43")
    for anchor in anchors:
        if anchor.subject != leaf.issuer or not valid_from(anchor) <= when <= valid_until(anchor):
            continue
        try:
            leaf.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise _ChainError("no CA certificate signed it")


def verify_peer(
    cert_chain: Union[Sequence[x509.Certificate], x509.Certificate],
    ca_cert: Union[x509.Certificate, Sequence[x509.Certificate]],
    expected_role: Union[str, Iterable[str], None] = None,
    expected_name: str | None = None,
    now=None,
) -> Peer:
    """Verify a peer's certificate against the deployment CA and return who it is.

    ``cert_chain`` is the leaf, optionally followed by intermediates (as received in TLS).
    ``ca_cert`` is one CA certificate or several (see :func:`load_ca`). ``expected_role`` is a
    role or a collection of acceptable roles; ``expected_name`` a node name. ``now`` is a
    datetime (naive means UTC) or POSIX timestamp; default the current time. Any failure
    raises :class:`IdentityError` saying what is wrong.
    """
    chain = [cert_chain] if isinstance(cert_chain, x509.Certificate) else list(cert_chain or ())
    if not chain:
        raise IdentityError("the peer presented no certificate")
    anchors = [ca_cert] if isinstance(ca_cert, x509.Certificate) else list(ca_cert)
    if not anchors:
        raise IdentityError("no CA certificate to verify the peer against")
    leaf = chain[0]
    role, name = role_and_name(leaf)
    who = f"{role} {name!r}"
    when = _as_utc(now)

    # Dates first, with a message a person can act on (the chain verifier's is terse).
    if when > valid_until(leaf):
        raise IdentityError(f"certificate expired on {_fmt_time(valid_until(leaf))} ({who})")
    if when < valid_from(leaf):
        raise IdentityError(
            f"certificate is not valid until {_fmt_time(valid_from(leaf))} ({who}); "
            "check the clocks"
        )

    try:
        if _HAVE_CLIENT_VERIFIER:
            verifier = (PolicyBuilder().store(Store(anchors)).time(when)
                        .build_client_verifier())
            verifier.verify(leaf, chain[1:])
        else:  # cryptography 42
            _manual_chain_check(leaf, chain[1:], anchors, when)
    except _CHAIN_ERRORS as exc:
        raise IdentityError(
            f"certificate of {who} is not trusted by this deployment's CA ({exc})"
        ) from None

    if expected_role is not None:
        roles = (expected_role,) if isinstance(expected_role, str) else tuple(expected_role)
        if role not in roles:
            wanted = " or ".join(_a(r) for r in roles)
            raise IdentityError(f"certificate is for {_a(role)}, expected {wanted} "
                                f"(certificate of {who})")
    if expected_name is not None and name != expected_name:
        raise IdentityError(f"certificate is for {who}, expected {expected_name!r}")
    return Peer(role=role, name=name)
