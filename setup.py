"""dioproxy: a caching pull-through mirror for container registries, on Twisted."""

from setuptools import find_packages, setup

setup(
    name="dioproxy",
    version="0.1.0",
    description="A verified, streaming, caching pull-through mirror for container images",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["dioproxy", "dioproxy.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/dioproxy_plugin.py"]},
    install_requires=[
        "twisted[tls]>=23.8",
        "treq>=23.11",
        "pyopenssl",
        "service-identity",
        "PyYAML>=6",
    ],
    extras_require={
        # cryptography signs the JWTs of the test world's token service (RS256, like Docker Hub's).
        "test": ["hypothesis", "ruff", "cryptography"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["dioproxy = dioproxy.admin:main"]},
)
