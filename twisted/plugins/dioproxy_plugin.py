"""Registers ``twistd dioproxy``; the real work lives in :mod:`dioproxy.service`.

This directory has no ``__init__.py`` on purpose: it is a portion of Twisted's ``twisted.plugins`` namespace.
"""

from twisted.application.service import ServiceMaker

dioproxy = ServiceMaker(
    "dioproxy",
    "dioproxy.service",
    "A verified, streaming, caching pull-through mirror for container registries",
    "dioproxy",
)
