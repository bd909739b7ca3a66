"""The proxy's configuration: one pydantic-settings class, read from ``TOKENTRAIL_*`` variables.

Nothing else in the proxy reads the environment. Tests and the CLI build their own ``Settings``.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from tokentrail.proxy.storage.engine import sqlite_path

DEFAULT_UPSTREAM = "http://127.0.0.1:8001"
DEFAULT_DB = "sqlite:///tokentrail.db"


class Settings(BaseSettings):
    """Every knob of ``tokentrail serve``; each is also a ``TOKENTRAIL_<NAME>`` environment variable."""

    # An empty variable means "not set" (compose files pass ${VAR:-} through as an empty string).
    model_config = SettingsConfigDict(env_prefix="TOKENTRAIL_", extra="ignore", env_parse_none_str="")

    upstream: str = Field(
        DEFAULT_UPSTREAM,
        description=(
            "Base URL of the vLLM server (a trailing /v1 is ignored); several, comma-separated, to spread "
            "trajectories over several servers."
        ),
    )
    upstream_health_interval_s: PositiveFloat = Field(
        2.0, description="Seconds between health probes of the upstreams (only with several)."
    )
    db: str = Field(DEFAULT_DB, description="SQLAlchemy database URL for the records.")
    host: str = Field("127.0.0.1", description="Address the proxy listens on.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(8000, description="Port the proxy listens on.")
    workers: PositiveInt = Field(
        1,
        description=(
            "Proxy processes serving the port together, one core each (the kernel spreads the "
            "connections); each has its own spool: the fallback path, then <name>.1<suffix>, ..."
        ),
    )
    instance: str | None = Field(
        None,
        max_length=256,
        description=(
            "This proxy's name in the database's metric counts (all its workers share it); empty: "
            "<host name>:<port>. Replicas need distinct names; keep one name across restarts."
        ),
    )
    upstream_connect_timeout: PositiveFloat = Field(
        5.0, description="Seconds to wait for a TCP connection to the upstream."
    )
    upstream_read_timeout: PositiveFloat | None = Field(
        600.0,
        description=(
            "Seconds the upstream may stay silent (before the first byte or between chunks) before "
            "the call fails with 504; empty for no limit."
        ),
    )
    upstream_max_connections: PositiveInt | None = Field(
        None, description="Cap on open upstream connections; empty for no cap (vLLM queues itself)."
    )
    upstream_keepalive_expiry: PositiveFloat = Field(
        4.0,
        description="Seconds an idle upstream connection is kept; below vLLM's 5 s keep-alive.",
    )
    recorder: Literal["thread", "process"] = Field(
        "thread",
        description=(
            "Where records are written: 'thread', a thread of each proxy process; 'process', one "
            "recorder process per host that every worker hands its records to (the relay then only "
            "relays, and the host's calls are numbered in the order they arrived)."
        ),
    )
    recorder_wait_s: PositiveFloat = Field(
        30.0,
        description=(
            "With the recorder process: seconds a relay keeps records in memory while the recorder "
            "cannot be reached (it is restarted when it dies) or answers nothing; then they go to the "
            "relay's spool."
        ),
    )
    fleet_control: Literal["auto", "database", "host"] = Field(
        "auto",
        description=(
            "Where pause, resume and the policy versions are decided: 'database', for every replica "
            "sharing the database (a control row they all apply and acknowledge); 'host', for this "
            "serve and its workers only; 'auto', database on PostgreSQL (where replicas run), else host."
        ),
    )
    order_wait_s: NonNegativeFloat = Field(
        5.0,
        description=(
            "Where other workers' or replicas' writers share the database: seconds a record waits "
            "for the record of a model reply its history holds, so that seq follows arrival order "
            "(then it is written, counted as unproven in tokentrail_record_order_waits_total); with "
            "the recorder process at most half TOKENTRAIL_RECORDER_WAIT_S. 0: never wait (behind "
            "sticky routing with the recorder process, where a made-up history such as few-shot "
            "examples would wait in vain)."
        ),
    )
    writer_queue_size: PositiveInt = Field(
        10_000,
        description="Records waiting for the database at most; past it records go to the fallback file.",
    )
    writer_batch_size: PositiveInt = Field(200, description="Records committed per transaction.")
    writer_retries: Annotated[int, Field(ge=0)] = Field(
        3, description="Retries of a failed batch before its records go to the fallback file."
    )
    durable: bool = Field(
        False,
        description=(
            "Hold the end of every recorded response until its record is committed (or kept in the "
            "fallback file), so a crash never loses a call whose answer the client saw end."
        ),
    )
    fallback_path: Path = Field(
        Path("tokentrail-fallback.jsonl"),
        description=(
            "The spool: JSON-lines file that keeps records the database could not take; they are "
            "replayed into the database, exactly once, when it works again. One per proxy process: "
            "a second process on the same path refuses to start."
        ),
    )
    db_busy_timeout_ms: PositiveInt = Field(
        5000, description="SQLite: milliseconds a write waits for another writer's lock before it fails."
    )
    spool_max_bytes: PositiveInt = Field(2**30, description="Largest size of the spool (1 GiB).")
    spool_full: Literal["serve", "reject"] = Field(
        "serve",
        description=(
            "When the spool is full: 'serve' keeps relaying calls and counts their records as lost; "
            "'reject' answers recorded calls with 503 until the spool drains."
        ),
    )
    max_body_bytes: PositiveInt = Field(
        100 * 2**20, description="Largest request body accepted; a larger one gets 413."
    )
    max_header_bytes: PositiveInt = Field(
        64 * 1024, description="Largest request head (request line and headers); a larger one gets 431."
    )
    client_header_timeout_s: PositiveFloat = Field(
        30.0, description="Seconds a client may take to send a request's head; then 408 (slowloris)."
    )
    client_body_timeout_s: PositiveFloat = Field(
        60.0, description="Seconds a client may stay silent while sending a request body; then 408."
    )
    client_send_timeout_s: PositiveFloat = Field(
        60.0,
        description=(
            "Seconds a client may take nothing of a response (stops reading a stream); then it is cut "
            "off, its vLLM request cancelled and the call recorded as client_too_slow."
        ),
    )
    max_concurrent_calls: PositiveInt | None = Field(
        None, description="Calls open at once at most; more get 503 at once. Empty: no limit."
    )
    graceful_shutdown_s: PositiveFloat = Field(
        30.0, description="Seconds in-flight calls may take to finish after SIGTERM."
    )
    keep_alive_s: PositiveInt = Field(
        75, description="Seconds the proxy keeps an idle client connection open."
    )
    api_key: SecretStr | None = Field(
        None,
        description=(
            "When set, /tokentrail/v1/ (the trajectory API) requires 'Authorization: Bearer <key>'; "
            "the pass-through routes never do."
        ),
    )
    learn_weight_versions: bool = Field(
        True,
        description=(
            "Ask each upstream's GET /weight_info (vLLM's RL routes) at start and after a resume, so "
            "every call records the policy version, and its /version, /v1/models and two small "
            "/tokenize probes at start (the model identity in each call's certificate); off for "
            "upstreams that are not vLLM."
        ),
    )
    pause_max_wait_s: PositiveFloat = Field(
        600.0,
        description=(
            "Seconds a recorded call may wait at the proxy while training has paused the fleet "
            "(POST /tokentrail/v1/pause); then 503 with Retry-After."
        ),
    )
    token_in: bool = Field(
        False,
        description=(
            "Token-in: a chat call that continues the previous call of its trajectory is sent to vLLM "
            "with that call's exact prompt + generated token IDs (prompt_token_ids where vLLM has the "
            "field, else kv_transfer_params.prompt_token_ids), "
            "so the trajectory stays one exact training sequence; a request header "
            "'X-TokenTrail-Token-In: true|false' decides per call."
        ),
    )
    token_in_memory_trajectories: PositiveInt = Field(
        10_000,
        description=(
            "Token-in: trajectories whose recent calls are kept in memory (the others are read from "
            "the database)."
        ),
    )
    token_in_wait_s: PositiveFloat = Field(
        5.0,
        description=(
            "Token-in: seconds a call waits for the still-open call it continues to be recorded "
            "(the client may send it the moment it has the answer)."
        ),
    )
    token_in_tokenize_timeout_s: PositiveFloat = Field(
        10.0, description="Token-in: seconds for vLLM's /tokenize to answer; then the call falls back."
    )
    token_in_stand_in: bool = Field(
        True,
        description=(
            "Token-in: find a continuing call's new tokens by rendering them after a short stand-in "
            "history (checked per template, see the next two); false: always render the whole history."
        ),
    )
    token_in_check_first: NonNegativeInt = Field(
        8,
        description=(
            "Token-in: calls of each chat template whose new tokens are found both after a short "
            "stand-in history and after the whole history, and compared, before the stand-in is "
            "trusted (0: trusted at once)."
        ),
    )
    token_in_check_every: NonNegativeInt = Field(
        100,
        description=(
            "Token-in: after that, one call in this many is checked again (0: never); a template "
            "that ever differs renders the whole history from then on."
        ),
    )
    viewer: bool = Field(
        True, description="Serve the trajectory viewer at /tokentrail/ui/ (its data needs the API key)."
    )
    metrics_require_key: bool = Field(
        False,
        description=(
            "With TOKENTRAIL_API_KEY set, /tokentrail/metrics requires the key too (Prometheus: "
            "authorization.credentials); otherwise it is open, like /tokentrail/health."
        ),
    )
    detokenize_concurrency: PositiveInt = Field(
        64, description="Requests to the upstream's /detokenize at once while the viewer decodes a sequence."
    )
    retention_days: PositiveFloat | None = Field(
        None,
        description=(
            "Prune finished trajectories whose first call is older than this many days, in the "
            "background (at start, then every 10 minutes); off when unset."
        ),
    )
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")

    @property
    def instance_name(self) -> str:
        """``instance``, or the host name and port when it is not set."""
        return self.instance or f"{socket.gethostname()}:{self.port}"

    @field_validator("upstream")
    @classmethod
    def _normalise_upstream(cls, value: str) -> str:
        """Accept ``http://host:port``, ``http://host:port/`` and ``http://host:port/v1`` alike."""
        urls = []
        for item in value.split(","):
            url = item.strip().rstrip("/")
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream {url!r} must start with http:// or https://")
            if "@" in url.partition("://")[2].partition("/")[0]:
                raise ValueError(
                    "an upstream URL must not carry credentials (user:password@); TokenTrail does not "
                    "send them, and vLLM's --api-key is the client's Authorization header, passed through"
                )
            urls.append(url.removesuffix("/v1"))
        if len(set(urls)) != len(urls):
            raise ValueError("an upstream is given twice")
        return ",".join(urls)

    def environment(self) -> dict[str, str]:
        """These settings as the ``TOKENTRAIL_*`` variables that give them back (for the processes
        ``serve`` starts: workers and the recorder), the instance name included as resolved here."""
        variables: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is None:
                text = ""
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            variables[f"TOKENTRAIL_{name.upper()}"] = text
        variables["TOKENTRAIL_INSTANCE"] = self.instance_name
        return variables

    @property
    def fleet_control_in_database(self) -> bool:
        """Whether pause, resume and versions are shared by every replica on the database (never for
        an in-memory SQLite database, which no other process can open)."""
        if self.fleet_control == "auto":
            return self.db.startswith(("postgresql", "postgres"))
        in_memory = make_url(self.db).get_backend_name() == "sqlite" and sqlite_path(self.db) is None
        return self.fleet_control == "database" and not in_memory

    @property
    def upstreams(self) -> list[str]:
        return self.upstream.split(",")
