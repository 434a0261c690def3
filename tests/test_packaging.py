"""The twistd plugin works from a plain ``pip install .`` into a fresh virtualenv, not only from a checkout."""

import os
import subprocess
import sys
import tempfile

from twisted.internet import threads
from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _install_and_ask() -> str:
    with tempfile.TemporaryDirectory() as venv:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = os.path.join(venv, "bin", "pip")
        subprocess.run([pip, "install", "-q", ROOT], check=True, capture_output=True)
        twistd = os.path.join(venv, "bin", "twistd")
        listing = subprocess.run([twistd, "--help"], cwd="/", capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([twistd, "dioproxy", "--help"], cwd="/", capture_output=True, text=True).stdout
        return listing + usage


class PackagingTests(unittest.TestCase):
    timeout = 600

    def test_plugin_from_an_installed_copy(self):
        def check(output: str) -> None:
            self.assertIn("dioproxy", output)
            self.assertIn("--cache-dir", output)
            self.assertIn("--upstream", output)

        return threads.deferToThread(_install_and_ask).addCallback(check)
