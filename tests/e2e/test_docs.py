"""``docs/clients.md`` shows exactly the snippets the end-to-end tests feed to real clients."""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from .snippets import doc_snippets

DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"


class DocsTests(unittest.TestCase):
    def test_every_snippet_is_in_the_docs(self) -> None:
        """Fails when a template in ``snippets.py`` changed but the page was not updated (or the reverse):
        re-render with ``python -m tests.e2e.snippets`` and paste."""
        text = DOC.read_text()
        for name, snippet in doc_snippets().items():
            self.assertIn(f"\n{snippet}```", text, f"docs/clients.md lacks the current rendering of {name}")
