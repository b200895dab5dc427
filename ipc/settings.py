"""Settings every process role shares, as the supervisor hands them to its children.

The supervisor builds `Settings` from defaults, the YAML file and CLI flags
(supervisor/config.py) and passes it to each child in the JUNEBUG_SETTINGS
environment variable (not argv, so secrets do not show in `ps`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

SETTINGS_ENV = "JUNEBUG_SETTINGS"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RedisSettings(_Frozen):
    host: str = "localhost"
    port: int = 6379
    db: int = 0
    password: SecretStr | None = None
    key_prefix: str = ""


class AmqpSettings(_Frozen):
    hostname: str = "127.0.0.1"
    port: int = 5672
    vhost: str = "/"
    username: str = "guest"
    password: SecretStr = SecretStr("guest")
    #: Accepted for compatibility with the original's config; AMQP has no databases.
    db: int = 0
    heartbeat: int = 60


class Settings(_Frozen):
    """The effective gateway configuration (docs sections 1.3-1.5 plus our additions)."""

    interface: str = "localhost"
    port: int = 8080
    logfile: str | None = None
    sentry_dsn: str | None = None
    #: None selects the embedded store; set by `redis:` in the file or any --redis-* flag.
    redis: RedisSettings | None = None
    #: None selects the embedded queue; set by `amqp:` in the file or any --amqp-* flag.
    amqp: AmqpSettings | None = None
    inbound_message_ttl: int = 600
    outbound_message_ttl: int = 172800
    allow_expired_replies: bool = False
    channels: dict[str, str] = Field(default_factory=dict)
    replace_channels: bool = False
    routers: dict[str, str] = Field(default_factory=dict)
    replace_routers: bool = False
    plugins: list[dict[str, Any]] = Field(default_factory=list)
    metric_window: float = 10.0
    logging_path: str = "logs/"
    log_rotate_size: int = 1_000_000
    max_log_files: int = 5
    max_logs: int = 100
    rabbitmq_management_interface: str | None = None

    # Our additions.
    data_dir: Path = Field(default_factory=lambda: default_data_dir())
    run_dir: Path | None = None
    api_workers: int = 1
    namespace: str = ""
    #: Seconds a webhook delivery is retried before it is dead-lettered.
    webhook_max_age: float = 86400.0
    webhook_timeout: float = 10.0
    #: Restart budget per channel (OTP intensity/period).
    restart_intensity: int = 5
    restart_period: float = 30.0
    shutdown_grace: float = 10.0
    #: Seconds a channel's Redis call keeps trying while Redis refuses connections (a
    #: restart, a failover) before it fails and the channel restarts; 0: fail at once.
    store_ride_through: float = 5.0
    #: The same for RabbitMQ: publishes wait, and consumers whose connection dropped are
    #: opened again in place (their unacked messages are delivered again). Longer than the
    #: store's: a RabbitMQ node restart took 7.6 s here (stop_app + start_app); no longer
    #: than the default shutdown_grace, which a stop during an outage may wait for.
    broker_ride_through: float = 10.0
    #: HTTP request bodies larger than this get 413; slower than body_timeout get 408.
    max_body_size: int = 1_048_576
    body_timeout: float = 30.0
    #: Bearer tokens the API accepts; empty means no authentication (Junebug's default).
    api_tokens: list[SecretStr] = Field(default_factory=list)
    #: Queued outbound messages per channel before sends get 429 (None: unlimited).
    default_queue_limit: int | None = None
    #: Channels the gateway accepts; creating one more gets 409 (the docs set no limit).
    max_channels: int = 1000
    #: Hosts webhook URLs may point at (exact names, or "*.example.org" for subdomains);
    #: empty allows any host (Junebug's behaviour).
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    #: Webhook POSTs in flight at once per queue; 1 delivers strictly in order.
    webhook_concurrency: int = 8
    #: Webhook answers larger than this are not read; a 2xx still counts as delivered.
    webhook_max_response_bytes: int = 65_536

    @property
    def backend_name(self) -> str:
        if self.redis is not None and self.amqp is not None:
            return "redis+rabbitmq"
        if self.redis is not None:
            return "redis+embedded-queue"
        if self.amqp is not None:
            return "embedded-store+rabbitmq"
        return "embedded"

    def to_env(self) -> str:
        """Serialize for a child's environment, secrets included (the env is private to us)."""
        data = self.model_dump(mode="json")
        if self.redis is not None and self.redis.password is not None:
            data["redis"]["password"] = self.redis.password.get_secret_value()
        if self.amqp is not None:
            data["amqp"]["password"] = self.amqp.password.get_secret_value()
        data["api_tokens"] = [token.get_secret_value() for token in self.api_tokens]
        return json.dumps(data)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        raw = env.get(SETTINGS_ENV)
        if raw is None:
            raise KeyError(f"{SETTINGS_ENV} is not set; children are started by junebug-supervisor")
        return cls.model_validate_json(raw)


def default_data_dir() -> Path:
    """$JUNEBUG_DATA_DIR, else $XDG_DATA_HOME/junebug, else ~/.local/share/junebug."""
    explicit = os.environ.get("JUNEBUG_DATA_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "junebug"
