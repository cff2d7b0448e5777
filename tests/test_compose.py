"""The production stack: docker-compose.yml validated by Debian's docker-compose."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from client.stack import MATCHING_CONFIG

ROOT = Path(__file__).resolve().parent.parent
SERIES = re.compile(r"\b((?:sortie|temporal)_[a-z_]+)")
SDK_SERIES = {
    "temporal_activity_schedule_to_start_latency",
    "temporal_workflow_task_schedule_to_start_latency",
    "temporal_worker_task_slots_used",
    "temporal_worker_task_slots_available",
    "temporal_request_failure",
}
"""The SDK's series the dashboard graphs (seen on a worker's /metrics, or documented failures)."""


def compose_config(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker-compose", "config"], cwd=directory, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    for name in ("docker-compose.yml", "Dockerfile", "grafana-dashboard.json"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "monitoring", tmp_path / "monitoring")
    shutil.copytree(ROOT / "config", tmp_path / "config")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    return tmp_path


def test_compose_file_is_valid_with_the_example_env(stack: Path) -> None:
    ran = compose_config(stack)
    assert ran.returncode == 0, ran.stderr
    services = yaml.safe_load(ran.stdout)["services"]

    assert {"postgresql", "temporal", "temporal-ui", "worker", "temporal-setup"} <= set(services)
    assert services["temporal"]["environment"]["DB"] == "postgres12"
    assert services["temporal"]["environment"]["POSTGRES_SEEDS"] == "postgresql"
    assert services["temporal-ui"]["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"
    worker = services["worker"]
    assert worker["build"]["context"] == str(stack)
    assert worker["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert worker["stop_signal"] == "SIGTERM"
    assert "BatchId" in " ".join(services["temporal-setup"]["command"])


def test_the_compose_server_shares_as_the_offline_one(stack: Path) -> None:
    # The server's dynamic config is mounted where it is read, and says what the dev server is
    # told: fairness on, and nothing more (partitions stay the default).
    ran = compose_config(stack)
    assert ran.returncode == 0, ran.stderr
    temporal = yaml.safe_load(ran.stdout)["services"]["temporal"]
    path = temporal["environment"]["DYNAMIC_CONFIG_FILE_PATH"]
    # docker-compose v1 prints a volume as "source:target:mode", v2 as a mapping
    volumes = [
        v if isinstance(v, dict) else dict(zip(("source", "target"), v.split(":"), strict=False))
        for v in temporal["volumes"]
    ]
    [mount] = [v for v in volumes if v["target"] == path]
    mounted = yaml.safe_load(Path(mount["source"]).read_text())
    told = dict(MATCHING_CONFIG[i + 1].split("=") for i in range(0, len(MATCHING_CONFIG), 2))
    assert {key: str(values[0]["value"]).lower() for key, values in mounted.items()} == told


def test_the_compose_server_has_task_queue_fairness(stack: Path) -> None:
    # Fairness between batches (a batch's id as fairness key) needs Temporal 1.29 or later; the
    # schema and setup tools are of the same release as the server.
    ran = compose_config(stack)
    assert ran.returncode == 0, ran.stderr
    services = yaml.safe_load(ran.stdout)["services"]
    repository, _, tag = services["temporal"]["image"].partition(":")
    assert repository == "temporalio/server"
    assert tuple(int(part) for part in tag.split(".")[:2]) >= (1, 29)
    for tool in ("temporal-schema", "temporal-setup"):
        assert services[tool]["image"] == f"temporalio/admin-tools:{tag}"
    assert services["worker"]["depends_on"]["temporal-setup"] == {
        "condition": "service_completed_successfully"
    }


def test_compose_refuses_a_missing_database_password(stack: Path) -> None:
    env = stack / ".env"
    env.write_text(
        "\n".join(
            line
            for line in env.read_text().splitlines()
            if not line.startswith("POSTGRES_PASSWORD")
        )
    )
    ran = compose_config(stack)
    assert ran.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in ran.stderr


def test_the_worker_image_copies_every_package_it_imports() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    packages = ["fly", "localfly", "sortie", "workflows", "activities"]
    for package in packages:
        assert f"COPY {package} ./{package}" in dockerfile
    assert "COPY worker.py starter.py ./" in dockerfile
    secrets = (ROOT / ".env.example").read_text()
    assert "FLY_API_TOKEN=\n" in secrets, ".env.example must not ship a token value"


def test_the_codec_server_runs_only_with_the_encryption_profile(stack: Path) -> None:
    ran = subprocess.run(
        ["docker-compose", "--profile", "encryption", "config"],
        cwd=stack,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    codec = yaml.safe_load(ran.stdout)["services"]["codec"]
    assert codec["command"][:3] == ["python", "-m", "sortie.codec"]
    assert str(codec["ports"][0]).startswith("127.0.0.1:"), "decrypts for this host only"
    assert codec["profiles"] == ["encryption"], "not started by a plain `up`"


def test_prometheus_scrapes_the_workers_metrics_and_grafana_shows_them(stack: Path) -> None:
    ran = compose_config(stack)
    assert ran.returncode == 0, ran.stderr
    services = yaml.safe_load(ran.stdout)["services"]
    address = services["worker"]["environment"]["SORTIE_METRICS_ADDRESS"]
    port = int(address.rsplit(":", 1)[1])
    scrape = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    [sd] = scrape["scrape_configs"][0]["dns_sd_configs"]
    assert (sd["names"], sd["port"]) == (["worker"], port)
    mounts = " ".join(str(v) for v in services["grafana"]["volumes"])
    assert "grafana-dashboard.json" in mounts and "datasource.yml" in mounts
    assert services["prometheus"]["ports"][0].startswith("127.0.0.1:")


def test_the_dashboard_graphs_only_series_that_exist() -> None:
    dashboard = json.loads((ROOT / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(sum|count|bucket)$", "", n) for e in exprs for n in SERIES.findall(e)}
    ours = set(re.findall(r'"(sortie_\w+)"', (ROOT / "sortie" / "metrics.py").read_text()))
    assert {n for n in used if n.startswith("sortie_")} <= ours
    assert {"sortie_machines_alive", "sortie_machines_created", "sortie_fly_calls"} <= used
    assert {n for n in used if n.startswith("temporal_")} <= SDK_SERIES
    datasource = yaml.safe_load((ROOT / "monitoring" / "grafana" / "datasource.yml").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {datasource["datasources"][0]["uid"]}


def test_minio_serves_the_worker_as_its_object_store(stack: Path) -> None:
    env = stack / ".env"
    env.write_text(
        env.read_text()
        .replace("AWS_ACCESS_KEY_ID=\n", "AWS_ACCESS_KEY_ID=sortie-minio\n")
        .replace("AWS_SECRET_ACCESS_KEY=\n", "AWS_SECRET_ACCESS_KEY=minio-secret-1\n")
    )
    # The suite names its own store in the environment, which compose would prefer to .env.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BUCKET_"))}
    ran = subprocess.run(
        ["docker-compose", "--profile", "minio", "config"],
        cwd=stack,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    services = yaml.safe_load(ran.stdout)["services"]
    worker, minio = services["worker"]["environment"], services["minio"]
    assert worker["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert worker["BUCKET_NAME"] == "sortie"
    assert minio["environment"]["MINIO_ROOT_USER"] == "sortie-minio"
    assert minio["environment"]["MINIO_ROOT_PASSWORD"] == "minio-secret-1"
    assert {"published": 9000, "target": 9000} in minio["ports"], "where machines upload"
    setup = services["minio-setup"]
    assert setup["command"] == ["mb", "--ignore-existing", "store/sortie"]
    assert setup["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "volumes" not in services["worker"], "no state on the worker's disk"
