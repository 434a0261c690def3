"""The upstream of the benchmark: the end-to-end world's token service and CNCF registry, seeded with bench data.

Built from ``tests/e2e`` parts (:class:`~tests.e2e.tokens.TokenService`, :class:`~tests.e2e.world.Registry`,
:mod:`tests.e2e.images`) rather than ``World`` itself, because the bench needs other data: blobs of hundreds of MB
that no image has to unpack. Those are pushed as bare blobs through the registry API (monolithic upload as the
seeding user), which takes seconds where gzip-compressing a random layer for skopeo would take a minute. One image,
for the ``skopeo copy`` scenario, is a real OCI image built and pushed like the e2e world's.

Every blob file also stays on local disk: nginx serves the very same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tests.e2e import images
from tests.e2e.procs import run, tool
from tests.e2e.tokens import SEED_PASSWORD, SEED_USER, TokenService
from tests.e2e.world import Registry

#: The repository that holds the bare blobs, and the one of the skopeo image (both docker.io official-style).
BLOB_REPOSITORY = "library/bench"
IMAGE_REPOSITORY = "library/benchapp"
IMAGE_TAG = "1.0"
MANIFEST_REPOSITORY = "library/benchhello"
MANIFEST_TAG = "1.0"

MANIFEST_ACCEPT = ", ".join(
    [
        images.OCI_INDEX,
        images.OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


@dataclass(frozen=True)
class BlobFile:
    """A random blob: its local file (served by nginx too), digest and size."""

    path: Path
    digest: str
    size: int

    def url_path(self, repository: str = BLOB_REPOSITORY) -> str:
        return f"/v2/{repository}/blobs/{self.digest}"


def random_blob(path: Path, size: int) -> BlobFile:
    """``size`` random bytes in ``path``, hashed while written (random: nothing on the way can compress it)."""
    sha = hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * 1024 * 1024))
            sha.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return BlobFile(path, "sha256:" + sha.hexdigest(), size)


class Upstream:
    """Token service + one token-guarded registry playing docker.io, and the bench's seeded content."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.tokens = TokenService(base, log_path=base / "token-service.log")
        self.registry: Registry | None = None
        self.realm = ""
        self.blobs: dict[str, BlobFile] = {}
        self.manifest: bytes = b""
        self.image_blobs: tuple[str, ...] = ()

    def start(self) -> None:
        self.realm = f"http://127.0.0.1:{self.tokens.start()}/token"
        self.registry = Registry(
            "docker.io", "registry.docker.io", self.base / "upstream", self.realm, self.tokens.cert_path, logs=self.base
        )
        self.registry.start()

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.stop()
        self.tokens.stop()

    @property
    def address(self) -> str:
        assert self.registry is not None
        return self.registry.address

    # -- seeding -----------------------------------------------------------------------------------------------------

    def _token(self, repository: str, actions: str) -> str:
        credentials = base64.b64encode(f"{SEED_USER}:{SEED_PASSWORD}".encode()).decode()
        request = urllib.request.Request(
            f"{self.realm}?service=registry.docker.io&scope=repository:{repository}:{actions}",
            headers={"Authorization": f"Basic {credentials}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["token"]

    def push_blob(self, name: str, blob: BlobFile, repository: str = BLOB_REPOSITORY) -> None:
        """POST an upload, PUT the file with its digest: the registry verifies it and links it into ``repository``."""
        token = self._token(repository, "push,pull")
        auth = {"Authorization": f"Bearer {token}"}
        connection = http.client.HTTPConnection(self.address, timeout=300)
        try:
            connection.request("POST", f"/v2/{repository}/blobs/uploads/", headers={**auth, "Content-Length": "0"})
            response = connection.getresponse()
            response.read()
            if response.status != 202:
                raise RuntimeError(f"upload of {name} refused: HTTP {response.status}")
            location = urlsplit(response.getheader("Location") or "")
            separator = "&" if location.query else ""
            target = f"{location.path}?{location.query}{separator}digest={blob.digest}"
            with open(blob.path, "rb") as body:
                headers = {**auth, "Content-Length": str(blob.size), "Content-Type": "application/octet-stream"}
                connection.request("PUT", target, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
            if response.status != 201:
                raise RuntimeError(f"upload of {name} failed: HTTP {response.status}")
        finally:
            connection.close()
        self.blobs[name] = blob

    def add_blob(self, name: str, size: int) -> BlobFile:
        blob = random_blob(self.base / f"{name}.blob", size)
        self.push_blob(name, blob)
        return blob

    def push_image(self, layer_mib: int) -> None:
        """A real single-platform OCI image with one random layer of ``layer_mib`` MiB, for ``skopeo copy``."""
        layout = images.single_platform(self.base / "layouts" / "app", "benchapp", IMAGE_TAG, big_layer_mib=layer_mib)
        self._skopeo_push(layout.path, IMAGE_TAG, IMAGE_REPOSITORY)
        self.image_blobs = tuple("sha256:" + p.name for p in (layout.path / "blobs" / "sha256").iterdir())

    def push_manifest_image(self) -> None:
        """The multi-platform index whose tag scenario 1 hammers; keeps its exact bytes for nginx's static copy."""
        layout = images.multi_platform(self.base / "layouts" / "hello", "benchhello", MANIFEST_TAG)
        self._skopeo_push(layout.path, MANIFEST_TAG, MANIFEST_REPOSITORY, all_platforms=True)
        index = json.loads((layout.path / "index.json").read_text())["manifests"][0]
        self.manifest = (layout.path / "blobs" / "sha256" / index["digest"].split(":", 1)[1]).read_bytes()

    def _skopeo_push(self, layout: Path, tag: str, repository: str, all_platforms: bool = False) -> None:
        run(
            [
                tool("/usr/bin/skopeo"),
                "--insecure-policy",
                "copy",
                *(["--all"] if all_platforms else []),
                "--quiet",
                "--dest-tls-verify=false",
                "--dest-creds",
                f"{SEED_USER}:{SEED_PASSWORD}",
                f"oci:{layout}:{tag}",
                f"docker://{self.address}/{repository}:{tag}",
            ]
        )

    # -- counting ------------------------------------------------------------------------------------------------------

    def log_offset(self) -> int:
        assert self.registry is not None
        return len(self.registry.requests())

    def blob_gets(self, since: int, digest: str | None = None) -> int:
        """Blob GETs the upstream logged after ``since`` (optionally of one digest): what a proxy really fetched."""
        assert self.registry is not None
        return sum(
            1
            for request in self.registry.requests()[since:]
            if request.method == "GET" and request.kind == "blob" and (digest is None or digest in request.uri)
        )

    def blob_downloads(self, since: int, digest: str) -> tuple[int, int]:
        """(GETs of ``digest`` that sent its bytes, 2xx; the others, e.g. a 401 challenge to a worker without a token
        yet) logged after ``since``."""
        assert self.registry is not None
        statuses = [
            request.status
            for request in self.registry.requests()[since:]
            if request.method == "GET" and request.kind == "blob" and digest in request.uri
        ]
        served = sum(1 for status in statuses if 200 <= status < 300)
        return served, len(statuses) - served
