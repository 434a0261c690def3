"""A token service like Docker Hub's ``auth.docker.io``, for the CNCF registries of the test world.

The registries run with ``auth: token``: every request without a valid Bearer token gets a 401 whose
``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` challenge points here, exactly like Docker Hub. This
service hands out RS256 JWTs signed with a key generated at start; the registry trusts the self-signed certificate of
that key (``rootcertbundle``). Anonymous callers get ``pull`` only; the seeding user (HTTP Basic) gets what it asks.

It runs in a thread with the standard library's HTTP server rather than on trial's reactor: the world outlives single
tests, and trial's reactor only spins while a test runs (and complains about sockets left open between tests).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

ISSUER = "dioproxy-test-token-service"
SEED_USER, SEED_PASSWORD = "seeder", "seed-password"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """The ``kid`` that registry 2.x looks up: base32 of the first 30 bytes of sha256(DER SubjectPublicKeyInfo),
    unpadded, in 12 groups of 4 joined by ``:``. Without it (or ``x5c``) the registry rejects every token."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, 48, 4))


class TokenService:
    """Signs registry tokens; ``start()`` serves ``GET /token`` on a loopback port in a daemon thread."""

    def __init__(self, directory: Path, log_path: Path, token_lifetime: int = 300) -> None:
        self.directory = directory
        self.log_path = log_path
        self.token_lifetime = token_lifetime
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = libtrust_key_id(self.key.public_key())
        self.cert_path = directory / "token-cert.pem"
        self.cert_path.write_bytes(self._self_signed_cert().public_bytes(serialization.Encoding.PEM))
        #: (service, scope, anonymous?) of every token handed out: tests count these like upstream requests.
        self.issued: list[tuple[str, str, bool]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def _self_signed_cert(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dioproxy test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )

    def sign(self, claims: dict) -> str:
        header = {"typ": "JWT", "alg": "RS256", "kid": self.key_id}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def issue(self, service: str, scopes: list[str], user: str | None) -> dict:
        """Docker Hub's answer shape: ``token`` and ``access_token``, ``expires_in``, ``issued_at``."""
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            kind, actions = parts[0], parts[-1].split(",")
            name = ":".join(parts[1:-1])
            granted = [a for a in actions if user == SEED_USER or a == "pull"]
            access.append({"type": kind, "name": name, "actions": granted})
            with self._lock:
                self.issued.append((service, scope, user is None))
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": service,
            "exp": now + self.token_lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = self.sign(claims)
        issued_at = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.token_lifetime,
            "issued_at": issued_at,
        }

    def token_count(self, service: str | None = None) -> int:
        with self._lock:
            return sum(1 for s, _, _ in self.issued if service is None or s == service)

    def start(self) -> int:
        """Serves on 127.0.0.1 (an ephemeral port, returned)."""
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path != "/token":
                    self.send_error(404)
                    return
                query = parse_qs(url.query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    if (name, password) != (SEED_USER, SEED_PASSWORD):
                        self.send_error(401)
                        return
                    user = name
                body = json.dumps(service.issue(query.get("service", [""])[0], query.get("scope", []), user)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                with open(service.log_path, "a") as log:
                    log.write(f"{self.address_string()} {format % args}\n")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="token-service", daemon=True).start()
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
