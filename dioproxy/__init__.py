"""dioproxy: a verified, streaming, caching pull-through mirror for container registries."""

__version__ = "0.1.0"
