"""Deployment files: the systemd unit, the Dockerfile, the example config, and the operations docs.

No Docker engine runs where the tests run, so the Dockerfile is checked statically: every COPY source exists in the
build context, and the command it starts is one our twistd plugin accepts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads
from twisted.trial import unittest

from dioproxy import config, snippets
from dioproxy.service import Options
from dioproxy.siblings import SCRAPE_GAUGES
from tests.test_ops_metrics import _full_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", read("deploy", "Dockerfile"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


class SystemdTests(unittest.TestCase):
    def unit_argv(self) -> list[str]:
        return snippets.proxy_argv(
            ["/opt/dioproxy/bin/twistd"], 8004, "0.0.0.0", "/var/cache/dioproxy", config="/etc/dioproxy/config.yaml"
        )

    def test_the_unit_file_is_the_shared_rendering(self):
        self.assertEqual(read("deploy", "dioproxy.service"), snippets.systemd_unit(self.unit_argv()))

    def test_hardening_and_restart(self):
        unit = read("deploy", "dioproxy.service")
        for line in (
            "User=dioproxy",
            "Restart=on-failure",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/cache/dioproxy",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=",
            "WantedBy=multi-user.target",
        ):
            self.assertIn(f"\n{line}\n", unit)
        self.assertIn("ExecStart=/opt/dioproxy/bin/twistd -n --pidfile= dioproxy --config", unit)
        self.assertNotIn("DynamicUser", unit)

    def test_exec_start_parses(self):
        argv = self.unit_argv()
        argv = argv[argv.index("dioproxy") + 1 :]
        example = os.path.join(ROOT, "deploy", "config.example.yaml")
        argv = [example if a == "/etc/dioproxy/config.yaml" else a for a in argv]
        options = Options()
        options.parseOptions([self.mktemp() if a == "/var/cache/dioproxy" else a for a in argv])
        self.assertEqual((options["port"], options["interface"]), (8004, "0.0.0.0"))

    def test_systemd_analyze_verify(self):
        self.assertIsNotNone(
            shutil.which("systemd-analyze"), "systemd-analyze is missing: scripts/install-system-deps installs systemd"
        )
        directory = self.mktemp()
        os.makedirs(directory)
        twistd = shutil.which("twistd") or "/bin/true"
        argv = snippets.proxy_argv([twistd], 8004, "0.0.0.0", "/var/cache/dioproxy", config="/etc/dioproxy/config.yaml")
        path = os.path.join(directory, "dioproxy.service")
        with open(path, "w") as f:
            f.write(snippets.systemd_unit(argv))

        def verify() -> subprocess.CompletedProcess:
            return subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True, timeout=60)

        def check(result: subprocess.CompletedProcess) -> None:
            problems = [
                line
                for line in (result.stdout + result.stderr).splitlines()
                if "dioproxy.service" in line and "Failed to" not in line
            ]
            self.assertEqual(problems, [])

        return threads.deferToThread(verify).addCallback(check)


class DockerfileTests(unittest.TestCase):
    def test_copy_sources_exist(self):
        copies = [rest for word, rest in dockerfile_instructions() if word == "COPY"]
        self.assertGreaterEqual(len(copies), 3)
        for rest in copies:
            *sources, _ = shlex.split(rest)
            for source in sources:
                self.assertFalse(source.startswith("--"), rest)
                self.assertTrue(os.path.exists(os.path.join(ROOT, source)), f"COPY {source}: not in the build context")

    def test_setup_py_reads_only_what_is_copied(self):
        copied = {s for word, rest in dockerfile_instructions() if word == "COPY" for s in shlex.split(rest)[:-1]}
        for name in re.findall(r'open\("([^"]+)"', read("setup.py")):
            self.assertIn(name, copied)

    def test_image_runs_the_plugin_with_the_example_config(self):
        instructions = dict(dockerfile_instructions())
        self.assertTrue(instructions["FROM"].startswith("python:") and "slim" in instructions["FROM"])
        self.assertEqual(instructions["EXPOSE"], "8004")
        self.assertIn("/var/cache/dioproxy", instructions["VOLUME"])
        self.assertTrue(any(w == "RUN" and r.startswith("pip install .") for w, r in dockerfile_instructions()))
        entry = json.loads(instructions["ENTRYPOINT"])
        cmd = json.loads(instructions["CMD"])
        self.assertEqual(entry[:4], ["twistd", "-n", "--pidfile=", "dioproxy"])
        argv = [
            a.replace("/etc/dioproxy/config.yaml", os.path.join(ROOT, "deploy", "config.example.yaml")) for a in cmd
        ]
        argv = [a.replace("/var/cache/dioproxy", self.mktemp()) for a in argv]
        options = Options()
        options.parseOptions(argv)
        self.assertEqual(options["port"], 8004)
        self.assertEqual(options.config.cache_max_size, 50 * 10**9)

    def test_user_is_not_root(self):
        users = [rest for word, rest in dockerfile_instructions() if word == "USER"]
        self.assertEqual(users, ["dioproxy"])


class ExampleConfigTests(unittest.TestCase):
    def test_loads_and_uses_the_defaults_it_claims(self):
        loaded = config.load_config(os.path.join(ROOT, "deploy", "config.example.yaml"))
        defaults = config.build_config(None)
        self.assertEqual(loaded.upstreams, defaults.upstreams)
        self.assertEqual((loaded.tag_ttl, loaded.connect_timeout, loaded.read_timeout), (300, 10, 60))
        self.assertEqual(loaded.cache_dir, "/var/cache/dioproxy")


class DocsTests(unittest.TestCase):
    def test_every_metric_is_documented(self):
        text = read("docs", "operations.md")
        documented = set(re.findall(r"`(dioproxy_[a-z_]+)`", text))
        families = {f.name: f.type for f in text_string_to_metric_families(_full_metrics().exposition().decode())}
        names = {name + ("_total" if kind == "counter" else "") for name, kind in families.items()}
        names |= set(SCRAPE_GAUGES)  # --workers N only
        self.assertEqual(names - documented, set(), "metrics missing from docs/operations.md")
        table = {n for n in documented if text.count(f"| `{n}` |")}
        self.assertEqual(table - names, set(), "documented metrics that do not exist")

    def test_cache_keys_are_documented(self):
        text = read("docs", "configuration.md")
        for key in ("max_size:", "max_age:", "cache.max_size", "cache.max_age", "SIGHUP"):
            self.assertIn(key, text)

    def test_operations_covers_the_issue(self):
        text = read("docs", "operations.md")
        for heading in ("## Installation", "## Configuration", "## Upgrades", "## Backup", "## Monitoring"):
            self.assertIn(heading, text)
        self.assertIn("docs/configuration.md", text)
        self.assertIn("docs/grafana-dashboard.json", text)
