"""Configuration from the environment, with Temporal's and Fly's own variable names.

Temporal: its environment configuration (temporalio.envconfig): the profile file
TEMPORAL_CONFIG_FILE, TEMPORAL_PROFILE, TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY,
TEMPORAL_TLS_*; the key and certificates stay in the profile, never in Settings.
Fly: FLY_API_TOKEN, FLY_API_BASE_URL, FLY_LOGS_BASE_URL, FLY_APP. Sortie's own: SORTIE_TASK_QUEUE,
SORTIE_UI_URL, SORTIE_LOCALFLY_URL, SORTIE_MAX_CONCURRENT_ACTIVITIES, SORTIE_SHUTDOWN_GRACE,
SORTIE_STATE_DIR, SORTIE_REAPER (on/off), SORTIE_REAPER_INTERVAL, SORTIE_DEPLOYMENT and
SORTIE_BUILD_ID (Worker Versioning), SORTIE_FLY_APPS (more apps to poll creates for at start, comma
separated; activities/pacing.py). Without FLY_API_TOKEN, Sortie runs offline against localfly.
The object store: AWS's names (sortie.store); without BUCKET_NAME, the stack's loopback S3.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.envconfig import ClientConfigProfile
from temporalio.worker import WorkerDeploymentConfig

from fly import FlySettings, FlyToken
from sortie.fields import parse_duration
from sortie.store import ObjectStore, StoreSettings, shared_store

LOCALFLY_URL = "http://127.0.0.1:4280"
LOCALFLY_TOKEN = "localfly-offline"


class Settings(BaseModel):
    """Where Temporal is and how the worker runs; holds no secret."""

    model_config = ConfigDict(frozen=True)

    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    task_queue: str = "sortie"
    ui_url: str = "http://localhost:8233"
    max_concurrent_activities: int = 1000
    shutdown_grace_s: float = 10.0
    state_dir: Path = Path(".state")
    reaper: bool = True
    reaper_interval_s: float = 600.0
    deployment_name: str | None = None
    build_id: str | None = None
    fly_apps: tuple[str, ...] = ()
    """Fly apps whose create queues the worker polls from its start (more join as batches
    name them)."""
    store: StoreSettings = Field(default_factory=StoreSettings.from_env)

    @model_validator(mode="after")
    def _version_is_whole(self) -> Settings:
        if (self.deployment_name is None) != (self.build_id is None):
            raise ValueError("SORTIE_DEPLOYMENT and SORTIE_BUILD_ID are set together or not at all")
        if self.deployment_name is not None and "." in self.deployment_name:
            raise ValueError("SORTIE_DEPLOYMENT may not contain '.'")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from the environment."""
        env = os.environ if environ is None else environ
        profile = temporal_profile(env)
        values = {
            "temporal_address": profile.address,
            "temporal_namespace": profile.namespace,
            "task_queue": env.get("SORTIE_TASK_QUEUE"),
            "ui_url": env.get("SORTIE_UI_URL"),
            "max_concurrent_activities": env.get("SORTIE_MAX_CONCURRENT_ACTIVITIES"),
            "shutdown_grace_s": env.get("SORTIE_SHUTDOWN_GRACE"),
            "state_dir": env.get("SORTIE_STATE_DIR"),
            "deployment_name": env.get("SORTIE_DEPLOYMENT"),
            "build_id": env.get("SORTIE_BUILD_ID"),
            "reaper": env.get("SORTIE_REAPER"),
            "reaper_interval_s": _seconds(env.get("SORTIE_REAPER_INTERVAL")),
            "fly_apps": [a.strip() for a in env.get("SORTIE_FLY_APPS", "").split(",") if a.strip()],
            "store": StoreSettings.from_env(env),
        }
        return cls.model_validate({k: v for k, v in values.items() if v})

    def deployment_config(self) -> WorkerDeploymentConfig | None:
        """Worker Versioning, workflows pinned to this build; None: an unversioned worker."""
        if self.deployment_name is None or self.build_id is None:
            return None
        return WorkerDeploymentConfig(
            version=WorkerDeploymentVersion(self.deployment_name, self.build_id),
            use_worker_versioning=True,
            default_versioning_behavior=VersioningBehavior.PINNED,
        )

    def blob_store(self) -> ObjectStore:
        """The object store every worker and starter share: answers, reports, sessions, jobs."""
        return shared_store(self.store)

    def workflow_url(self, workflow_id: str) -> str:
        """The Web UI page of a workflow."""
        base = self.ui_url.rstrip("/")
        return f"{base}/namespaces/{self.temporal_namespace}/workflows/{workflow_id}"


class TemporalConfigError(ValueError):
    """Temporal's profile could not be read: names the file, never a key."""


def _seconds(text: str | None) -> float | None:
    """A duration such as `90s`, `10m` or `1h` (a bare number is seconds)."""
    return parse_duration(text) if text else None


def temporal_profile(environ: Mapping[str, str] | None = None) -> ClientConfigProfile:
    """Temporal's profile (file, then TEMPORAL_* over it), read as the temporal CLI reads it."""
    env = os.environ if environ is None else environ
    # An empty variable (`TEMPORAL_API_KEY=` in a .env) means unset, not "an empty key".
    given = {k: v for k, v in env.items() if v or not k.startswith("TEMPORAL_")}
    try:
        return ClientConfigProfile.load(override_env_vars=given)
    except RuntimeError as error:  # the SDK's ConfigError: an unknown profile, a broken file
        where = given.get("TEMPORAL_CONFIG_FILE", "the default profile file")
        raise TemporalConfigError(f"Temporal configuration in {where}: {error}") from None


def fly_connection(environ: Mapping[str, str] | None = None) -> tuple[FlySettings, FlyToken]:
    """Real Fly when FLY_API_TOKEN is set; otherwise localfly (SORTIE_LOCALFLY_URL)."""
    env = os.environ if environ is None else environ
    if env.get("FLY_API_TOKEN"):
        return FlySettings.from_env(env), FlyToken.from_env(env)
    url = env.get("SORTIE_LOCALFLY_URL", LOCALFLY_URL)
    offline = {**env, "FLY_API_BASE_URL": url, "FLY_LOGS_BASE_URL": url}
    offline.setdefault("SORTIE_FLY_RATE_LIMIT", "off")
    return FlySettings.from_env(offline), FlyToken.from_env({"FLY_API_TOKEN": LOCALFLY_TOKEN})
