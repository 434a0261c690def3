"""Generated test images: OCI image layouts written by plain Python, pushed upstream with skopeo.

The clients under test unpack what they pull (dockerd, podman and containerd all extract every layer), so the
layers are real gzip-compressed tar files and the config carries the matching ``rootfs.diff_ids``. Nothing here
touches the network; the layouts are what ``skopeo copy oci:DIR:TAG docker://...`` reads.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

#: A fixed timestamp keeps small layers byte-identical between runs (only the big layer is random).
EPOCH = 1_700_000_000


@dataclass
class Blob:
    """A blob written into a layout: its digest, size and media type, i.e. an OCI descriptor."""

    digest: str
    size: int
    media_type: str
    platform: dict[str, str] | None = None
    annotations: dict[str, str] | None = None

    def descriptor(self) -> dict:
        desc: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            desc["platform"] = self.platform
        if self.annotations:
            desc["annotations"] = self.annotations
        return desc


@dataclass
class Layout:
    """An OCI image layout on disk (``oci-layout``, ``index.json``, ``blobs/sha256/``)."""

    path: Path
    refs: list[Blob] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    def put(self, data: bytes, media_type: str) -> Blob:
        """Stores bytes content-addressed and returns their descriptor."""
        hexdigest = hashlib.sha256(data).hexdigest()
        (self.path / "blobs" / "sha256" / hexdigest).write_bytes(data)
        return Blob(f"sha256:{hexdigest}", len(data), media_type)

    def put_json(self, obj: dict, media_type: str) -> Blob:
        return self.put(json.dumps(obj, indent=None, separators=(",", ":"), sort_keys=True).encode(), media_type)

    def tag(self, blob: Blob, tag: str) -> None:
        """Names ``blob`` in index.json so that ``oci:DIR:TAG`` resolves to it."""
        self.refs.append(Blob(blob.digest, blob.size, blob.media_type, annotations={REF_NAME: tag}))
        index = {"schemaVersion": 2, "manifests": [ref.descriptor() for ref in self.refs]}
        (self.path / "index.json").write_text(json.dumps(index))


def make_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """Returns (gzip bytes, diff_id) of a tar holding ``files``; diff_id is the sha256 of the uncompressed tar."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(name).parent) for name in files} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, EPOCH
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    # Level 1: the big layer is random (incompressible) data, so a higher level only costs time.
    compressed = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    return compressed, "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def add_image(layout: Layout, arch: str, layers: list[dict[str, bytes]], label: str) -> Blob:
    """Writes layers, a config and an image manifest for linux/``arch``; returns the manifest's descriptor."""
    layer_blobs, diff_ids = [], []
    for files in layers:
        data, diff_id = make_layer(files)
        layer_blobs.append(layout.put(data, OCI_LAYER_GZIP))
        diff_ids.append(diff_id)
    config = {
        "architecture": arch,
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/true"], "Labels": {"dioproxy.test": label}, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"dioproxy e2e seed {label}"}],
    }
    config_blob = layout.put_json(config, OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b in layer_blobs],
    }
    blob = layout.put_json(manifest, OCI_MANIFEST)
    blob.platform = {"architecture": arch, "os": "linux"}
    return blob


def small_files(name: str, arch: str) -> list[dict[str, bytes]]:
    """Two small layers whose content differs per image and platform (so no blob is shared by accident)."""
    return [
        {"etc/os-release": f'NAME="dioproxy-test"\nID={name}\nVARIANT_ID={arch}\n'.encode()},
        {
            f"usr/share/{name}/hello.txt": f"hello from {name} on linux/{arch}\n".encode(),
            f"usr/share/{name}/README": b"Generated by tests/e2e/images.py\n" * 20,
        },
    ]


def multi_platform(directory: Path, name: str, tag: str) -> Layout:
    """An OCI index with linux/amd64 and linux/arm64 images, tagged ``tag``."""
    layout = Layout(directory)
    manifests = [add_image(layout, arch, small_files(name, arch), f"{name}-{arch}") for arch in ("amd64", "arm64")]
    index = layout.put_json(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [m.descriptor() for m in manifests]},
        OCI_INDEX,
    )
    layout.tag(index, tag)
    return layout


def single_platform(directory: Path, name: str, tag: str, big_layer_mib: int = 0) -> Layout:
    """A linux/amd64 image; with ``big_layer_mib`` one more layer holds that many MiB of random bytes."""
    layout = Layout(directory)
    layers = small_files(name, "amd64")
    if big_layer_mib:
        layers.append({f"opt/{name}/random.bin": os.urandom(big_layer_mib * 1024 * 1024)})
    layout.tag(add_image(layout, "amd64", layers, name), tag)
    return layout
