"""End-to-end suite: real clients (dockerd, podman, containerd, skopeo, nginx) pull through a real dioproxy from
real registries (the CNCF ``docker-registry`` behind a Docker-Hub-like token service), all on loopback.

Run it as root (it starts daemons) after ``scripts/install-system-deps``: ``.venv/bin/trial tests.e2e``.
Every pull's time and upstream request counts end up in ``_trial_temp/e2e-logs/pulls.txt``, next to every
daemon's log. Layout: :mod:`.world` (upstreams, seeding), :mod:`.images` (generated OCI layouts), :mod:`.tokens`
(token service), :mod:`.clients` (proxy and client harnesses), :mod:`.snippets` (client configuration shared with
``docs/clients.md``), :mod:`.base` (the cold / warm / offline pull sequence), :mod:`.report` (measurements).
"""
