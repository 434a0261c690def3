"""The Chinese docs (``README.zh.md``, ``docs/zh/``) show exactly the snippets the English docs and
``dioproxy client-config`` show, rendered by :mod:`dioproxy.snippets` (the ones the end-to-end suite feeds to real
clients), and their other configuration blocks are the English docs' own or valid dioproxy configurations.

Each generated snippet is a fenced block right after a ``<!-- snippet: NAME -->`` line, NAME a key of
``doc_snippets()``. After changing a template, re-render the Chinese pages with ``python -m tests.test_docs_zh``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml
from twisted.trial import unittest

from dioproxy.config import build_config
from dioproxy.snippets import doc_snippets

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.zh.md", *sorted((ROOT / "docs" / "zh").glob("*.md"))]
ENGLISH = ROOT / "docs" / "clients.md"

MARKED = re.compile(r"<!-- snippet: (?P<name>[^>]+?) -->\n```(?P<lang>[\w-]*)\n(?P<body>.*?)```", re.DOTALL)
FENCED = re.compile(r"^ *```(?P<lang>[\w-]*)\n(?P<body>.*?)^ *```", re.DOTALL | re.MULTILINE)
#: Languages of client and server configuration files: such a block is generated, or copied from the English docs.
CONFIG_LANGS = {"json", "toml", "nginx", "ini"}


def render(text: str) -> str:
    """``text`` with every marked block replaced by the current rendering of its snippet."""
    snippets = doc_snippets()
    return MARKED.sub(lambda m: f"<!-- snippet: {m['name']} -->\n```{m['lang']}\n{snippets[m['name']]}```", text)


class ChineseDocsTests(unittest.TestCase):
    def test_pages_exist_and_link_both_ways(self):
        self.assertIn("README.zh.md", (ROOT / "README.md").read_text().split("\n## ")[0])  # near the top
        readme_zh = (ROOT / "README.zh.md").read_text()
        self.assertIn("(README.md)", readme_zh.split("\n## ")[0])
        for page in PAGES[1:]:
            self.assertIn(f"(docs/zh/{page.name})", readme_zh, f"README.zh.md does not link {page.name}")
        for page in PAGES:
            for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
                self.assertTrue((page.parent / target).exists(), f"{page.name}: broken link {target}")

    def test_marked_snippets_are_the_generated_ones(self):
        """Fails when a template in ``dioproxy/snippets.py`` changed but the Chinese pages were not re-rendered
        (``python -m tests.test_docs_zh``), or when a page's copy was edited by hand."""
        snippets = doc_snippets()
        seen = set()
        for page in PAGES:
            for m in MARKED.finditer(page.read_text()):
                name = m["name"]
                self.assertIn(name, snippets, f"{page.name}: no snippet named {name!r}")
                self.assertEqual(
                    m["body"], snippets[name], f"{page.name}: {name} differs; run python -m tests.test_docs_zh"
                )
                seen.add(name)
        self.assertEqual(seen, set(snippets), "every snippet of docs/clients.md is in the Chinese docs too")

    def test_other_config_blocks_come_from_the_english_docs_or_parse(self):
        english = {m["body"] for m in FENCED.finditer(ENGLISH.read_text())}
        for page in PAGES:
            text = page.read_text()
            marked = {m.start("body") for m in MARKED.finditer(text)}
            for m in FENCED.finditer(text):
                if m.start("body") in marked:
                    continue
                if m["lang"] in CONFIG_LANGS:
                    self.assertIn(m["body"], english, f"{page.name}: a {m['lang']} block not generated nor English")
                elif m["lang"] == "yaml":
                    build_config(yaml.safe_load(m["body"]))  # a dioproxy configuration, valid as shown


if __name__ == "__main__":
    for page in PAGES if sys.argv[1:] == [] else [Path(p) for p in sys.argv[1:]]:
        text = page.read_text()
        rendered = render(text)
        if rendered != text:
            page.write_text(rendered)
            print(f"re-rendered {page.relative_to(ROOT)}")
