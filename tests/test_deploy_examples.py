"""The fleet's example deployments (deploy/) and the architecture picture, checked against the code.

No Docker engine or Kubernetes cluster runs where the tests run, so the files are parsed: every dioproxy option
and configuration key in them goes through :class:`dioproxy.service.Options` and the config loader, and the names
and ports that must line up (nginx upstreams and replicas, advertise URLs and services, Redis and S3 addresses and
the services behind them, keys and the store's identities) are compared. What can run here runs for real: the
embedded scripts (the config render, the bucket maker against a real SeaweedFS), ``nginx -t``, ``weed -h``,
``systemd-analyze verify`` and ``dot``.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from urllib.parse import urlsplit

import yaml
from twisted.internet import threads
from twisted.trial import unittest

from dioproxy import config as configmod
from dioproxy.service import DRAIN_TIMEOUT, Options
from dioproxy.workers import STOP_TIMEOUT, worker_count
from tests.seaweed import WEED, SeaweedFS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")


def read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def parse_args(argv: list[str], config_path: str, cache_dir: str) -> Options:
    """``argv`` (the plugin's options) parsed as twistd would, with the container's paths replaced by ours."""
    swap = {"/etc/dioproxy/config.yaml": config_path, "/var/cache/dioproxy": cache_dir}
    options = Options()
    options.parseOptions([swap.get(a, a) for a in argv])
    return options


def run_script(script: str, paths: dict[str, str], env: dict[str, str] | None = None) -> str:
    """An embedded ``python -c`` script, its absolute paths moved to ``paths``; blocking (call it in a thread)."""
    for old, new in paths.items():
        script = script.replace(old, new)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    if result.returncode:
        raise AssertionError(f"script failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def flag_value(args: list[str], flag: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"-{flag}="))


class WeedFlagsMixin:
    def check_weed(self, image: str, args: list[str]) -> None:
        """The image is the SeaweedFS version the tests run, and each flag of ``args`` exists in that ``weed``."""
        version = subprocess.run([WEED, "version"], capture_output=True, text=True, timeout=30).stdout.split()[2]
        self.assertEqual(image, f"chrislusf/seaweedfs:{version}")
        self.assertEqual(args[:2], ["-logtostderr", "mini"])
        usage = subprocess.run([WEED, "mini", "-h"], capture_output=True, text=True, timeout=30)
        known = set(re.findall(r"^\s+-([\w.]+)", usage.stdout + usage.stderr, re.M))
        for arg in args[2:]:
            self.assertIn(arg.lstrip("-").split("=")[0], known, f"weed mini has no {arg}")


class ArchitectureTests(unittest.TestCase):
    def test_the_svg_is_the_rendering_of_its_source(self):
        self.assertIsNotNone(shutil.which("dot"), "dot is missing: scripts/install-system-deps installs graphviz")
        source = os.path.join(ROOT, "docs", "img", "architecture.dot")

        def render() -> str:
            return subprocess.run(
                ["dot", "-Tsvg", source], capture_output=True, text=True, timeout=60, check=True
            ).stdout

        def check(svg: str) -> None:
            self.assertEqual(svg, read("docs", "img", "architecture.svg"), "re-render: dot -Tsvg architecture.dot")

        return threads.deferToThread(render).addCallback(check)

    def test_every_label_is_in_the_svg_and_scaling_md_shows_it(self):
        texts = {
            html.unescape(t) for t in re.findall(r"<text [^>]*>([^<]*)</text>", read("docs", "img", "architecture.svg"))
        }
        labels = re.findall(r'label="([^"]+)"', read("docs", "img", "architecture.dot"))
        self.assertGreater(len(labels), 15)
        for label in labels:
            for line in label.split("\\n"):
                self.assertIn(line.strip(), {t.strip() for t in texts})
        self.assertIn("](img/architecture.svg)", read("docs", "scaling.md"))


class WorkersUnitTests(unittest.TestCase):
    dropin = os.path.join(DEPLOY, "dioproxy.service.d", "workers.conf")

    def exec_starts(self, text: str) -> list[str]:
        return [line.partition("=")[2] for line in text.splitlines() if line.startswith("ExecStart=")]

    def test_it_is_the_main_unit_with_workers_auto(self):
        main = self.exec_starts(read("deploy", "dioproxy.service"))
        dropin = self.exec_starts(read("deploy", "dioproxy.service.d", "workers.conf"))
        self.assertEqual(dropin, ["", main[0] + " --workers auto"])  # reset first, or systemd refuses a second one
        argv = dropin[1].split()
        argv = argv[argv.index("dioproxy") + 1 :]
        options = parse_args(argv, os.path.join(DEPLOY, "config.example.yaml"), self.mktemp())
        self.assertEqual(options["workers"], worker_count("auto"))

    def test_systemd_waits_for_the_workers_to_drain(self):
        stop = re.findall(r"^TimeoutStopSec=(\d+)s$", read("deploy", "dioproxy.service.d", "workers.conf"), re.M)
        self.assertEqual(len(stop), 1)
        self.assertGreater(int(stop[0]), STOP_TIMEOUT)

    def test_systemd_analyze_verify_with_the_dropin(self):
        self.assertIsNotNone(shutil.which("systemd-analyze"), "scripts/install-system-deps installs systemd")
        directory = self.mktemp()
        os.makedirs(os.path.join(directory, "dioproxy.service.d"))
        twistd = shutil.which("twistd") or "/bin/true"
        for name in ("dioproxy.service", os.path.join("dioproxy.service.d", "workers.conf")):
            with open(os.path.join(directory, name), "w") as f:
                f.write(read("deploy", name).replace("/opt/dioproxy/bin/twistd", twistd))
        path = os.path.join(directory, "dioproxy.service")

        def verify() -> tuple[subprocess.CompletedProcess, str]:
            result = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True, timeout=60)
            shown = subprocess.run(
                ["systemd-analyze", "cat-config", path], capture_output=True, text=True, timeout=60
            ).stdout
            return result, shown

        def check(outcome: tuple[subprocess.CompletedProcess, str]) -> None:
            result, _ = outcome
            problems = [
                line
                for line in (result.stdout + result.stderr).splitlines()
                if ("dioproxy.service" in line or "workers.conf" in line) and "Failed to" not in line
            ]
            self.assertEqual(problems, [])

        return threads.deferToThread(verify).addCallback(check)


class ComposeTests(WeedFlagsMixin, unittest.TestCase):
    def setUp(self):
        self.compose = yaml.safe_load(read("deploy", "docker-compose.yml"))
        self.services = self.compose["services"]
        self.replicas = {name: s for name, s in self.services.items() if name.startswith("dioproxy")}
        self.config_path = os.path.join(DEPLOY, "compose", "dioproxy.yaml")

    def options(self, service: dict) -> Options:
        return parse_args(service["command"], self.config_path, self.mktemp())

    def test_three_replicas_run_the_plugin_with_the_shared_config(self):
        self.assertEqual(len(self.replicas), 3)
        for name, service in self.replicas.items():
            self.assertIn("./compose/dioproxy.yaml:/etc/dioproxy/config.yaml:ro", service["volumes"])
            cache = [v for v in service["volumes"] if v.endswith(":/var/cache/dioproxy")]
            self.assertEqual(len(cache), 1, name)
            self.assertIn(cache[0].split(":")[0], self.compose["volumes"])
            options = self.options(service)
            self.assertIsNotNone(options.config.coordination)
            self.assertIsNotNone(options.config.storage.s3)
        caches = {v for s in self.replicas.values() for v in s["volumes"] if v.endswith(":/var/cache/dioproxy")}
        self.assertEqual(len(caches), 3, "each replica has its own hot tier")

    def test_the_image_is_built_from_the_dockerfile(self):
        for service in [*self.replicas.values(), self.services["bucket"]]:
            build = service["build"]
            self.assertTrue(os.path.isdir(os.path.join(DEPLOY, build["context"])))
            self.assertTrue(os.path.isfile(os.path.join(DEPLOY, build["context"], build["dockerfile"])))
        for service in self.services.values():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("./"):
                    self.assertTrue(os.path.exists(os.path.join(DEPLOY, source)), volume)

    def test_advertised_addresses_are_the_services_nginx_balances(self):
        # advertise is unset: the default is http://<fqdn>:<port>, and in a container the fqdn is its hostname.
        upstream = re.search(r"upstream dioproxy \{(.*?)\}", read("deploy", "compose", "nginx.conf"), re.S).group(1)
        servers = re.findall(r"^\s*server ([\w.-]+:\d+)", upstream, re.M)
        advertised = set()
        for name, service in self.replicas.items():
            options = self.options(service)
            self.assertIsNone(options.config.coordination.advertise)
            self.assertEqual(service["hostname"], name)
            advertised.add(f"{service['hostname']}:{options['port']}")
        self.assertEqual(sorted(servers), sorted(advertised))
        listen = re.search(r"^\s*listen (\d+);", read("deploy", "compose", "nginx.conf"), re.M).group(1)
        self.assertEqual(self.services["nginx"]["ports"], [f"{listen}:{listen}"])
        self.assertEqual(set(self.services["nginx"]["depends_on"]), set(self.replicas))

    def test_redis_and_the_store_are_the_services_named(self):
        cfg = configmod.load_config(self.config_path)
        self.assertEqual(host_port(cfg.coordination.redis), ("redis", 6379))
        self.assertEqual(self.services["redis"]["command"][0], "redis-server")
        args = self.services["seaweedfs"]["command"]
        self.assertEqual(host_port(cfg.storage.s3.endpoint), ("seaweedfs", int(flag_value(args, "s3.port"))))
        self.assertEqual(flag_value(args, "ip"), "seaweedfs")
        self.assertIn(
            "./compose/seaweedfs-s3.json:" + flag_value(args, "s3.config") + ":ro",
            self.services["seaweedfs"]["volumes"],
        )
        identities = json.loads(read("deploy", "compose", "seaweedfs-s3.json"))["identities"]
        keys = {(c["accessKey"], c["secretKey"]) for i in identities for c in i["credentials"]}
        self.assertEqual(keys, {(cfg.storage.s3.access_key, cfg.storage.s3.secret_key)})
        for replica in self.replicas.values():
            self.assertEqual(replica["depends_on"]["bucket"]["condition"], "service_completed_successfully")

    def test_trusted_proxies_are_the_compose_network(self):
        cfg = configmod.load_config(self.config_path)
        subnet = self.compose["networks"]["mirror"]["ipam"]["config"][0]["subnet"]
        self.assertEqual(cfg.security.trusted_proxies, (subnet,))
        for service in self.services.values():
            self.assertEqual(service["networks"], ["mirror"])

    def test_seaweedfs_flags_exist(self):
        service = self.services["seaweedfs"]
        self.assertEqual(service["entrypoint"], ["/usr/bin/weed"])
        return threads.deferToThread(self.check_weed, service["image"], service["command"])

    def test_nginx_accepts_the_site(self):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.assertTrue(os.access(nginx, os.X_OK), "nginx is missing: scripts/install-system-deps installs it")
        prefix = os.path.abspath(self.mktemp())
        os.makedirs(prefix)
        site = re.sub(r"server dioproxy(\d):", r"server 127.0.0.\1:", read("deploy", "compose", "nginx.conf"))
        with open(os.path.join(prefix, "site.conf"), "w") as f:
            f.write(site)
        with open(os.path.join(prefix, "nginx.conf"), "w") as f:
            f.write(f"pid {prefix}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n  access_log off;\n")
            f.write(
                f"  client_body_temp_path {prefix};\n  proxy_temp_path {prefix};\n  include {prefix}/site.conf;\n}}\n"
            )

        def test() -> subprocess.CompletedProcess:
            return subprocess.run(
                [nginx, "-t", "-p", prefix, "-c", os.path.join(prefix, "nginx.conf")],
                capture_output=True,
                text=True,
                timeout=60,
            )

        def check(result: subprocess.CompletedProcess) -> None:
            self.assertEqual(result.returncode, 0, result.stderr)

        return threads.deferToThread(test).addCallback(check)

    def test_the_bucket_script_makes_the_bucket_on_a_real_seaweedfs(self):
        """With the compose file's own identity file and keys: the replicas' config is accepted by the store, and a
        second run (the bucket exists) succeeds too."""
        cfg = configmod.load_config(self.config_path).storage.s3
        base = os.path.abspath(tempfile.mkdtemp(prefix="deploy-sw-", dir="."))  # short: weed's unix socket is there
        store = SeaweedFS(base, bucket="ready-check")
        store.access_key, store.secret_key = cfg.access_key, cfg.secret_key
        shutil.copy(os.path.join(DEPLOY, "compose", "seaweedfs-s3.json"), store.identity_path)
        with open(self.config_path) as f:
            data = yaml.safe_load(f)
        data["storage"]["s3"]["endpoint"] = store.endpoint
        path = os.path.join(base, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        script = self.services["bucket"]["entrypoint"][2]
        self.assertEqual(self.services["bucket"]["entrypoint"][:2], ["python", "-c"])

        def run() -> list[str]:
            store.start()
            try:
                first = run_script(script, {"/etc/dioproxy/config.yaml": path})
                second = run_script(script, {"/etc/dioproxy/config.yaml": path})
                names = [b["Name"] for b in store.client().list_buckets()["Buckets"]]
                return [first, second, names]
            finally:
                store.stop()

        def check(outcome: list) -> None:
            first, second, names = outcome
            self.assertEqual(first, second)
            self.assertEqual(first, f"bucket {cfg.bucket} ready\n")
            self.assertIn(cfg.bucket, names)

        return threads.deferToThread(run).addCallback(check)


class KubernetesTests(WeedFlagsMixin, unittest.TestCase):
    def setUp(self):
        docs = list(yaml.safe_load_all(read("deploy", "kubernetes.yaml")))
        self.objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        self.assertEqual(len(self.objects), len(docs), "a kind and name twice")
        self.secret = self.objects["Secret", "dioproxy"]["stringData"]
        self.pod = self.objects["Deployment", "dioproxy"]["spec"]["template"]["spec"]
        self.init = {c["name"]: c for c in self.pod["initContainers"]}
        self.container = self.pod["containers"][0]

    def render(self, pod_ip: str) -> str:
        """The ``config`` init container's script run on the ConfigMap and the Secret: the config it writes."""
        base = os.path.abspath(self.mktemp())
        dirs = {name: os.path.join(base, name) for name in ("template", "secret", "config")}
        for d in dirs.values():
            os.makedirs(d)
        with open(os.path.join(dirs["template"], "config.yaml"), "w") as f:
            f.write(self.objects["ConfigMap", "dioproxy"]["data"]["config.yaml"])
        with open(os.path.join(dirs["secret"], "coordination-secret"), "w") as f:
            f.write(self.secret["coordination-secret"])
        container = self.init["config"]
        self.assertEqual(container["command"][:2], ["python", "-c"])
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
        self.assertEqual(fields, {"POD_IP": "status.podIP"})
        paths = {
            "/etc/dioproxy-template/": dirs["template"] + "/",
            "/etc/dioproxy-secret/": dirs["secret"] + "/",
            "/etc/dioproxy/": dirs["config"] + "/",
        }
        run_script(container["command"][2], paths, {**env, "POD_IP": pod_ip})
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        self.assertEqual(
            mounts, {"/etc/dioproxy-template": "template", "/etc/dioproxy-secret": "secret", "/etc/dioproxy": "config"}
        )
        path = os.path.join(dirs["config"], "config.yaml")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        return path

    def environ(self, container: dict) -> dict[str, str]:
        """A container's environment as the kubelet makes it from the Secret."""
        out = {}
        for e in container["env"]:
            ref = e["valueFrom"]["secretKeyRef"]
            self.assertEqual(ref["name"], "dioproxy")
            out[e["name"]] = self.secret[ref["key"]]
        return out

    def loaded(self, pod_ip: str = "10.1.2.3") -> configmod.Config:
        with open(self.render(pod_ip)) as f:
            data = yaml.safe_load(f)
        return configmod.build_config(data, environ=self.environ(self.container))

    def test_the_mirror_runs_with_the_rendered_config(self):
        path = self.render("10.1.2.3")
        cache = self.mktemp()
        options = parse_args(self.container["args"], path, cache)
        self.assertEqual(options["port"], self.container["ports"][0]["containerPort"])
        self.assertEqual(options.config.cache_dir, cache)
        mounts = {m["mountPath"]: m["name"] for m in self.container["volumeMounts"]}
        self.assertEqual(mounts, {"/etc/dioproxy": "config", "/var/cache/dioproxy": "cache"})
        volumes = {v["name"] for v in self.pod["volumes"]}
        for c in [self.container, *self.init.values()]:
            self.assertLessEqual({m["name"] for m in c["volumeMounts"]}, volumes)

    def test_advertise_is_the_pods_address_and_port(self):
        port = self.container["ports"][0]["containerPort"]
        for ip, url in (("10.1.2.3", f"http://10.1.2.3:{port}"), ("fd00::7", f"http://[fd00::7]:{port}")):
            coordination = self.loaded(ip).coordination
            self.assertEqual(coordination.advertise, url)
            self.assertEqual(coordination.secret, self.secret["coordination-secret"])

    def test_keys_come_from_the_secret(self):
        cfg = self.loaded().storage.s3
        self.assertEqual((cfg.access_key, cfg.secret_key), (self.secret["s3-access-key"], self.secret["s3-secret-key"]))
        self.assertEqual(self.environ(self.init["bucket"]), self.environ(self.container))
        identities = json.loads(self.secret["seaweedfs-s3.json"])["identities"]
        keys = {(c["accessKey"], c["secretKey"]) for i in identities for c in i["credentials"]}
        self.assertEqual(keys, {(cfg.access_key, cfg.secret_key)})
        for key in ("coordination-secret", "s3-secret-key"):
            self.assertNotIn(self.secret[key], self.objects["ConfigMap", "dioproxy"]["data"]["config.yaml"])

    def service_port(self, name: str, url: str) -> None:
        """``url`` names the Service ``name`` and its port, which leads to a port of the pods it selects."""
        service = self.objects["Service", name]["spec"]
        deployment = self.objects["Deployment", name]["spec"]
        self.assertEqual(service["selector"], deployment["selector"]["matchLabels"])
        self.assertEqual(deployment["template"]["metadata"]["labels"], deployment["selector"]["matchLabels"])
        host, port = host_port(url)
        self.assertEqual(host, name)
        (entry,) = [p for p in service["ports"] if p["port"] == port]
        ports = {
            p["name"]: p["containerPort"] for c in deployment["template"]["spec"]["containers"] for p in c["ports"]
        }
        self.assertIn(entry["targetPort"], ports)
        return ports[entry["targetPort"]]

    def test_services_line_up(self):
        cfg = self.loaded()
        self.assertEqual(self.service_port("redis", cfg.coordination.redis), 6379)
        s3_port = self.service_port("seaweedfs", cfg.storage.s3.endpoint)
        weed = self.objects["Deployment", "seaweedfs"]["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(int(flag_value(weed["args"], "s3.port")), s3_port)
        self.assertEqual(flag_value(weed["args"], "ip"), "$(POD_IP)")
        self.assertIn("POD_IP", {e["name"] for e in weed["env"]})
        self.assertEqual(
            self.service_port("dioproxy", f"http://dioproxy:{self.container['ports'][0]['containerPort']}"), 8004
        )

    def test_seaweedfs_flags_exist(self):
        weed = self.objects["Deployment", "seaweedfs"]["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(weed["command"], ["/usr/bin/weed"])
        return threads.deferToThread(self.check_weed, weed["image"], weed["args"])

    def test_the_bucket_script_is_the_compose_files(self):
        compose = yaml.safe_load(read("deploy", "docker-compose.yml"))
        self.assertEqual(self.init["bucket"]["command"], ["python", "-c", compose["x-bucket-script"]])

    def test_hot_tier_fits_its_volume_and_the_drain_fits_the_grace_period(self):
        cache = next(v for v in self.pod["volumes"] if v["name"] == "cache")
        limit = configmod.parse_size(cache["emptyDir"]["sizeLimit"].replace("Gi", "GiB"), "sizeLimit")
        self.assertLess(self.loaded().cache_max_size, limit)
        self.assertGreater(self.pod["terminationGracePeriodSeconds"], DRAIN_TIMEOUT)
        for probe in ("readinessProbe", "livenessProbe"):
            self.assertEqual(self.container[probe]["httpGet"], {"path": "/healthz", "port": "http"})
