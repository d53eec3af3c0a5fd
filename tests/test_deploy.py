"""deploy/: the systemd unit, the container image and compose file, the Kubernetes manifests, the
Prometheus rules and the Grafana dashboard are checked against the real thing.

No container engine or cluster runs here, so what cannot be run is checked structurally (the
Dockerfile's stages, user, COPY sources; manifests' selectors and ports). What can be run is
run: systemd-analyze and promtool on the files as shipped, the health-check commands and the
Kubernetes probes against a live relayd started from the shipped config, and every metric a
dashboard panel or an alert names is looked up in a live scrape of relayd after some traffic.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from relayd.config import Config, build_config
from tests.helpers import ConnectionClosed, Relayd, collect_chunks, pure_wheel_files

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# Worst case of a drain (docs/operations.md, "Deployment"): three waits bounded by
# server.drain_timeout_s, then the embedded server's stop (SHUTDOWN, then SIGKILL: 5 s each).
DRAIN_WAITS = 3
EMBEDDED_STOP_S = 10


def tool(name: str) -> str:
    """The path of a command-line tool the suite needs; scripts/test.sh installs them."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run the suite with scripts/test.sh, which installs it")
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (systemd EnvironmentFile, compose env_file); # comments."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def duration_s(text: str) -> float:
    """``45s``, ``1m30s``, ``60`` (seconds) as seconds: systemd and compose durations."""
    total, rest = 0.0, str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", rest):
        return float(rest)
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)", rest):
        total += float(number) * {"ms": 0.001, "s": 1, "min": 60, "m": 60, "h": 3600}[unit]
    assert total > 0, f"cannot read the duration {text!r}"
    return total


def worst_drain_s(config: Config, embedded: bool) -> float:
    return DRAIN_WAITS * config.server.drain_timeout_s + (EMBEDDED_STOP_S if embedded else 0)


# -- metrics: one checker for the dashboard and the alerts ------------------------------------------

# Series Prometheus itself adds to every target.
PROMETHEUS_SERIES = {"up"}
TARGET_LABELS = {"instance", "job"}
METRIC_REF = re.compile(r"\b((?:relayd|process)_[a-zA-Z0-9_]+|up)\b\s*(\{[^}]*\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"")


async def live_series(relayd: Relayd) -> dict[str, set[str]]:
    """Every series name a running relayd exports after some traffic, with its label names.

    Names are the sample names of the scrape (``relayd_chunks_in_total``,
    ``relayd_ack_latency_seconds_bucket``, ``process_open_fds``): exactly what PromQL selects.
    The traffic makes the labelled series appear: a live and a replayed delivery, a completed
    stream, a refused token and a refused frame.
    """
    stream = "deploy-metrics"
    async with await relayd.producer() as producer:
        assert (await producer.open(stream))["type"] == "opened"
        live = await relayd.consumer(stream)
        await live.expect("subscribed", stream=stream)
        assert (await producer.append(stream, 1, {"delta": "hello"}))["type"] == "ack"
        assert (await producer.end(stream))["type"] == "ended"
        chunks, end = await collect_chunks(live, stream)
        assert len(chunks) == 1 and end["reason"] == "completed"
        await live.ws.close()
        refused = await producer.append("never-opened", 1, "x")
        assert refused["type"] == "error", refused
    replay = await relayd.consumer(stream)
    await replay.expect("subscribed", stream=stream)
    chunks, _ = await collect_chunks(replay, stream)
    assert len(chunks) == 1
    await replay.ws.close()
    bad = await relayd.consumer(stream, token="not-a-jwt")
    with pytest.raises(ConnectionClosed):
        await bad.next()

    assert relayd.session is not None
    async with relayd.session.get(f"{relayd.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def metric_refs(expr: str) -> Iterable[tuple[str, set[str]]]:
    """(series name, label names it is matched on) for every relayd_*, process_* or up selector."""
    for match in METRIC_REF.finditer(expr):
        name, braces = match.group(1), match.group(2) or ""
        yield name, {label for label, _ in MATCHER.findall(braces)}


def assert_exported(exprs: Mapping[str, str], series: Mapping[str, set[str]]) -> None:
    """Every series an expression selects, and every label it matches on, exists in ``series``."""
    problems = []
    for where, expr in exprs.items():
        refs = list(metric_refs(expr))
        if not refs:
            problems.append(f"{where}: names no relayd metric: {expr}")
        for name, labels in refs:
            if name in PROMETHEUS_SERIES:
                continue
            if name not in series:
                problems.append(f"{where}: {name} is not exported by relayd")
            elif missing := labels - series[name] - TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {sorted(missing)}")
    assert not problems, "\n".join(problems)


def promql_parses(exprs: Mapping[str, str], tmp_path: Path) -> None:
    """promtool parses every expression (as recording rules: `promtool check rules`)."""
    rules = [{"record": f"check:expr_{i}", "expr": expr} for i, expr in enumerate(exprs.values())]
    path = tmp_path / "exprs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    result = run(tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- systemd ----------------------------------------------------------------------------------------

SYSTEMD = DEPLOY / "systemd"


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit_passes_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    """The unit verifies cleanly (no unknown keys) and its sandbox scores at most 2.0 exposure.

    The shipped ExecStart is /usr/local/bin/relayd; the copy checked points at the relayd
    entry point of this installation, which verify requires to exist.
    """
    text = (SYSTEMD / "relayd.service").read_text()
    assert "ExecStart=/usr/local/bin/relayd serve --config /etc/relayd/relay.toml" in text
    relayd_bin = shutil.which("relayd") or str(Path(sys.executable).with_name("relayd"))
    assert Path(relayd_bin).exists()
    unit = tmp_path / "relayd.service"
    unit.write_text(text.replace("/usr/local/bin/relayd", relayd_bin))
    analyze = tool("systemd-analyze")
    verify = run(analyze, "verify", str(unit))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert str(unit) not in verify.stdout + verify.stderr, verify.stdout + verify.stderr
    security = run(analyze, "security", "--offline=yes", "--threshold=20", str(unit))
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr


def test_systemd_unit_gives_the_drain_time_and_matches_the_config() -> None:
    """SIGTERM drains; the stop timeout covers the worst-case drain; the data dir is the StateDirectory."""
    settings = unit_settings((SYSTEMD / "relayd.service").read_text())
    assert settings["Type"] == ["simple"]  # relayd does not speak sd_notify
    assert settings["KillSignal"] == ["SIGTERM"]
    assert settings["User"] == ["relayd"]
    env = {k: v for k, _, v in (e.partition("=") for e in settings["Environment"])}
    env |= env_file(SYSTEMD / "relayd.env.example")
    config = build_config(tomllib.loads((SYSTEMD / "relay.toml").read_text()), env)
    assert duration_s(settings["TimeoutStopSec"][0]) > worst_drain_s(config, embedded=config.embedded_redis)
    assert config.embedded.data_dir == f"/var/lib/{settings['StateDirectory'][0]}"
    assert settings["WorkingDirectory"] == [config.embedded.data_dir]
    sysusers = (SYSTEMD / "relayd.sysusers.conf").read_text()
    assert re.search(r"^u relayd ", sysusers, re.M)


# -- Docker -----------------------------------------------------------------------------------------

DOCKER = DEPLOY / "docker"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, args = pending.partition(" ")
            instructions.append((word.upper(), args.strip()))
            pending = ""
    return instructions


def healthcheck_command(args: str) -> list[str]:
    """The exec-form command of a HEALTHCHECK: the JSON array after CMD."""
    cmd = json.loads(args[args.index("CMD") + 3 :])
    assert isinstance(cmd, list)
    return [str(part) for part in cmd]


def test_dockerfile_is_multi_stage_non_root_and_copies_what_exists() -> None:
    """Two stages, a slim Python runtime, a numeric non-root USER, HEALTHCHECK, SIGTERM, real COPY sources."""
    instructions = dockerfile_instructions(DOCKER / "Dockerfile")
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith("AS build"), froms
    assert froms[-1].startswith("python:3.11-slim"), froms
    runtime = instructions[[w for w, _ in instructions].index("FROM", 1) :]
    users = [args for word, args in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    exposed = [int(args.split("/")[0]) for word, args in runtime if word == "EXPOSE"]
    image_config = build_config(tomllib.loads((DOCKER / "relay.toml").read_text()), {})
    assert exposed == [image_config.server.port]
    assert image_config.server.host == "0.0.0.0"
    env = " ".join(args for word, args in runtime if word == "ENV")
    assert "RELAYD_CONFIG=/etc/relayd/relay.toml" in env
    health = [args for word, args in runtime if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]

    allowed = [
        line[1:].rstrip("/")
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for word, args in instructions:
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by Dockerfile.dockerignore"


def test_the_image_build_stage_has_what_building_the_wheel_reads(tmp_path: Path) -> None:
    """The build stage's COPYs, and nothing else of the checkout, are enough to build the wheel.

    No container engine runs here, so the stage is replayed: its COPY sources are copied into an
    empty directory as the Dockerfile places them, and ``pip wheel`` builds relayd from it (pure;
    the compiled build reads the same files). A file the build reads and the stage does not copy
    (the licence, the build backend, setup.py) fails here as it would fail ``docker build``.
    """
    instructions = dockerfile_instructions(DOCKER / "Dockerfile")
    build_stage = instructions[: [w for w, _ in instructions].index("FROM", 1)]
    context = tmp_path / "src"
    context.mkdir()
    for word, args in build_stage:
        if word != "COPY":
            continue
        *sources, dest = shlex.split(args)
        for source in sources:
            target = context / dest / Path(source).name if dest.endswith("/") else context / dest
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
            else:
                shutil.copy2(ROOT / source, target)
    run = [w for w, a in build_stage if w == "RUN" and "pip wheel" in a]
    assert run, "the build stage builds the wheels with pip wheel"
    names = pure_wheel_files(context, tmp_path / "wheels")
    assert "relayd/relay.py" in names and "relayd/store/lua/lib.lua" in names, names[:20]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), [n for n in names if "dist-info" in n]


def test_compose_builds_the_dockerfile_with_consistent_ports_and_healthy_dependencies() -> None:
    """compose.yml builds deploy/docker/Dockerfile from the repo root, waits for a healthy Valkey."""
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    relayd_svc, valkey = compose["services"]["relayd"], compose["services"]["valkey"]
    context = (DOCKER / relayd_svc["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / relayd_svc["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert relayd_svc["depends_on"] == {"valkey": {"condition": "service_healthy"}}
    assert valkey["healthcheck"]["test"]

    env = env_file(DOCKER / f"{relayd_svc['env_file']}.example")
    env |= {k: str(v) for k, v in relayd_svc["environment"].items()}
    config = build_config(tomllib.loads((DOCKER / "relay.toml").read_text()), env)
    assert config.redis.url.startswith("redis://valkey:")
    exposed = next(args for word, args in dockerfile_instructions(DOCKER / "Dockerfile") if word == "EXPOSE")
    _host_port, container_port = relayd_svc["ports"][0].split(":")
    assert int(container_port) == config.server.port == int(exposed)
    assert duration_s(relayd_svc["stop_grace_period"]) > worst_drain_s(config, embedded=False)
    assert "readyz" in " ".join(relayd_svc["healthcheck"]["test"])


async def test_container_health_checks_pass_against_a_live_relayd(relayd: Relayd) -> None:
    """The Dockerfile's HEALTHCHECK and compose's healthcheck commands, run as written, succeed."""
    health = next(a for w, a in dockerfile_instructions(DOCKER / "Dockerfile") if w == "HEALTHCHECK")
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    commands = [healthcheck_command(health), compose["services"]["relayd"]["healthcheck"]["test"][1:]]
    env = {**os.environ, "RELAYD_SERVER_PORT": str(relayd.server.port)}
    for command in commands:
        assert command[0] == "python"
        proc = await _run_async([sys.executable, *command[1:]], env)
        assert proc == 0, command


async def _run_async(args: list[str], env: dict[str, str]) -> int:
    proc = await asyncio.create_subprocess_exec(*args, env=env)
    return await asyncio.wait_for(proc.wait(), 20)


# -- Kubernetes -------------------------------------------------------------------------------------

K8S = DEPLOY / "k8s"


def manifests() -> dict[str, dict[str, Any]]:
    """Every document under deploy/k8s by kind (one of each)."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                assert doc["kind"] not in docs, f"two {doc['kind']}s"
                docs[doc["kind"]] = doc
    return docs


def k8s_config(docs: Mapping[str, Any], **overrides: str) -> Config:
    """The ConfigMap's relay.toml with the Secret's entries as environment (envFrom), as the pod gets it."""
    raw = tomllib.loads(docs["ConfigMap"]["data"]["relay.toml"])
    return build_config(raw, {**docs["Secret"]["stringData"], **overrides})


def test_k8s_manifests_fit_together() -> None:
    """Selectors, ports, the config mount, the kustomization and the shutdown timing agree."""
    docs = manifests()
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret", "ServiceMonitor"} <= set(docs)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).exists()
    deploy = docs["Deployment"]
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = k8s_config(docs)
    assert ports["http"] == config.server.port
    assert config.server.host == "0.0.0.0"
    assert config.redis.url, "the Secret provides RELAYD_REDIS_URL"
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] in ports
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == docs["Service"]["spec"]["ports"][0]["name"]
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == ports["http"]

    env = {e["name"]: e["value"] for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert env["RELAYD_CONFIG"] == f"{mount['mountPath']}/relay.toml"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert container["envFrom"][0]["secretRef"]["name"] == docs["Secret"]["metadata"]["name"]
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == config.embedded.data_dir)
    assert data["name"] in {v["name"] for v in pod["spec"]["volumes"] if "emptyDir" in v}

    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + worst_drain_s(config, embedded=False)
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]


async def test_k8s_probes_answer_200_on_relayd_run_from_the_configmap(
    redis_server: str, key_prefix: str, tmp_path: Path
) -> None:
    """relayd started from the ConfigMap and Secret answers every probe path on the probe's port."""
    docs = manifests()
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # Only what a test must change: a free local port, the session's Valkey, this test's keys.
    config = k8s_config(
        docs,
        RELAYD_SERVER_HOST="127.0.0.1",
        RELAYD_SERVER_PORT="0",
        RELAYD_REDIS_URL=redis_server,
        RELAYD_REDIS_KEY_PREFIX=key_prefix,
        RELAYD_EMBEDDED_DATA_DIR=str(tmp_path),
    )
    probes = [container[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")]
    assert {p["httpGet"]["path"] for p in probes} == {"/healthz", "/readyz"}
    async with Relayd(config) as relayd:
        assert relayd.session is not None
        for probe in probes:
            port = probe["httpGet"]["port"]
            assert (ports[port] if isinstance(port, str) else port) == k8s_config(docs).server.port
            async with relayd.session.get(f"{relayd.url}{probe['httpGet']['path']}") as resp:
                assert resp.status == 200, (probe, await resp.text())


# -- Prometheus and Grafana -------------------------------------------------------------------------

PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"


def alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def dashboard_exprs(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """Every panel target's expression, with Grafana's variables replaced by PromQL values."""
    exprs = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$instance", ".*")
            assert "$" not in expr, expr
            exprs[f"{panel['title']}/{target['refId']}"] = expr
    return exprs


def test_prometheus_rules_and_config_pass_promtool() -> None:
    """promtool checks the rules, runs their unit tests, and checks the example prometheus.yml."""
    promtool = tool("promtool")
    for args in (
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts.test.yml"),
        ("check", "config", "prometheus.yml"),
    ):
        result = run(promtool, *args, cwd=PROMETHEUS)
        assert result.returncode == 0, result.stdout + result.stderr


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


def test_every_alert_has_for_severity_and_annotations_pointing_at_the_runbook() -> None:
    """Each alert waits (for:), has a severity, says what happened, and its runbook sections exist."""
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    docs = (ROOT / "docs" / "operations.md").read_text()
    anchors = heading_anchors(docs)
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["for"] and rule["labels"]["severity"] in ("critical", "warning", "info"), rule
            annotations = rule["annotations"]
            assert annotations["summary"] and annotations["description"], rule["alert"]
            assert annotations["runbook"].startswith("docs/operations.md#"), rule["alert"]
            for anchor in re.findall(r"docs/operations\.md#([a-z0-9_-]+)", annotations["runbook"]):
                assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/operations.md"
            assert f"`{rule['alert']}`" in docs, f"{rule['alert']} is not explained in docs/operations.md"


async def test_alerts_name_only_metrics_relayd_exports(relayd: Relayd) -> None:
    assert_exported(alert_exprs(), await live_series(relayd))


def load_dashboard_builder() -> Any:
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_is_generated_and_well_formed(tmp_path: Path) -> None:
    """relayd.json is build_dashboard.py's output, uses the datasource and instance variables, and its PromQL parses."""
    text = (GRAFANA / "relayd.json").read_text()
    assert text == load_dashboard_builder().render(), "run python deploy/grafana/build_dashboard.py"
    dashboard = json.loads(text)
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["instance"]["type"] == "query"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert 'instance=~"$instance"' in target["expr"], target["expr"]
    promql_parses(dashboard_exprs(dashboard), tmp_path)


async def test_dashboard_panels_name_only_metrics_relayd_exports(relayd: Relayd) -> None:
    dashboard = json.loads((GRAFANA / "relayd.json").read_text())
    assert_exported(dashboard_exprs(dashboard), await live_series(relayd))


def test_k8s_and_compose_run_several_instances_of_one_deployment() -> None:
    """Scale-out is the default shape: several replicas (one pod at a time may go), and compose's two
    relayd services share one Valkey and one configuration, publishing their writes for each other."""
    docs = manifests()
    assert docs["Deployment"]["spec"]["replicas"] >= 2
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert k8s_config(docs).redis.notify
    services = yaml.safe_load((DOCKER / "compose.yml").read_text())["services"]
    relayds = [svc for name, svc in services.items() if name.startswith("relayd")]
    assert len(relayds) == 2
    assert relayds[0]["environment"] == relayds[1]["environment"]
    assert relayds[0]["env_file"] == relayds[1]["env_file"]
    assert {svc["ports"][0].split(":")[0] for svc in relayds} == {"8080", "8081"}
