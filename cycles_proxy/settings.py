"""Every knob of cycles-proxy, in one place.

Sources, highest precedence first: command-line flags, environment variables
(``CYCLES_PROXY_<NAME>``; ``CYCLES_BASE_URL`` and ``CYCLES_API_KEY`` as the Cycles clients read
them), a TOML file (``--config`` or ``CYCLES_PROXY_CONFIG``), then the defaults below.
See ``config/cycles-proxy.example.toml`` for a commented example.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cycles_proxy.authority.base import OveragePolicy, Unit
from cycles_proxy.money import parse_amount


class FailurePolicy(enum.StrEnum):
    FAIL_CLOSED = "fail_closed"
    FAIL_OPEN = "fail_open"
    SHADOW = "shadow"


class PriceRule(BaseModel):
    """The price of one model (or a glob of models) in the budget's unit."""

    #: exact model name or a glob such as ``llama3*`` or ``*:70b``
    model: str
    #: price per GPU-second (accepts ``"1usd/h"``-style strings, see money.py)
    per_gpu_second: int = 0
    #: price per input (prompt) token
    per_input_token: int = 0
    #: price per output (generated) token
    per_output_token: int = 0

    @field_validator("per_gpu_second", "per_input_token", "per_output_token", mode="before")
    @classmethod
    def _amount(cls, v: Any) -> int:
        return parse_amount(v, per_second=True)


def default_db_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cycles-proxy" / "ledger.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CYCLES_PROXY_",
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
        validate_default=True,
        env_parse_none_str="none",
    )

    # --- listening and upstream -------------------------------------------------------------
    host: str = "127.0.0.1"
    """Address the proxy listens on (Ollama's usual address)."""
    port: int = Field(11434, ge=0, le=65535)
    """Port the proxy listens on (Ollama's default; move Ollama to ``upstream``)."""
    upstream: str = "http://127.0.0.1:11435"
    """Base URL of the model server (Ollama, llama.cpp, vLLM, TGI) the proxy forwards to."""
    upstream_api_key: str | None = None
    """Bearer key sent to the upstream instead of the tenant's key (which is never forwarded)."""
    upstream_connect_timeout_s: float = Field(10.0, gt=0)
    """Give up connecting to the upstream after this long (the reservation is released)."""
    upstream_first_byte_timeout_s: float = Field(600.0, gt=0)
    """Longest wait for the upstream's response to begin (model loads, non-streaming answers);
    past it the caller gets 504 and the reservation is released."""
    upstream_read_timeout_s: float = Field(120.0, gt=0)
    """Longest silence between two chunks once a response has begun; past it the stream ends
    with an error line and the work done so far is committed."""
    client_body_timeout_s: float = Field(60.0, gt=0)
    """Longest time a caller may take to send a metered request's body (408 beyond)."""
    max_inflight_per_tenant: int = Field(16, ge=0)
    """Metered requests one tenant may have running at once (429 beyond; 0 = no limit), so no
    tenant can fill the upstream's queue on its own."""
    drain_timeout_s: float = Field(30.0, ge=0)
    """On SIGTERM, how long in-flight requests may finish before they are cut (and settled)."""

    # --- ledger, tenants, budgets -----------------------------------------------------------
    db: Path = Field(default_factory=default_db_path)
    """SQLite file of the embedded ledger and of the API keys (created if missing)."""
    db_synchronous: str = "NORMAL"
    """SQLite ``synchronous`` mode: NORMAL survives process crashes; FULL also power loss."""
    anonymous_tenant: str | None = None
    """Tenant billed for requests without a key (the Ollama CLI sends none); unset = 401."""
    unit: Unit = Unit.USD_MICROCENTS
    """Unit of budgets and prices: USD_MICROCENTS (1 USD = 100,000,000), TOKENS or CREDITS."""
    app_scope: str | None = None
    """Optional Cycles ``app`` subject field on every reservation (a budget level below tenant)."""
    overage_policy: OveragePolicy = OveragePolicy.ALLOW_IF_AVAILABLE
    """What a commit larger than its reservation does (REJECT never exceeds a budget)."""
    reservation_ttl_ms: int = Field(120_000, ge=1_000, le=86_400_000)
    """Lease of a reservation; long streams extend it while they run."""
    max_reservation_extensions: int = Field(2_880, ge=0, le=1_000_000)
    """Extensions the embedded ledger grants one reservation. A running stream is extended by
    half its lease every half lease, so the default holds a stream's budget for 48 h at the
    default lease (a crashed proxy extends nothing: its holds still lapse after one lease). A
    remote Cycles server applies its own limit (the reference server's is 10)."""
    grace_period_ms: int = Field(30_000, ge=0, le=60_000)
    """Extra time after the lease in which a late commit is still accepted."""

    # --- cost ----------------------------------------------------------------------------------
    default_price_per_gpu_second: int = 27_778
    """Price of one GPU-second for models no price rule matches (default: 1 USD per GPU-hour)."""
    prices: list[PriceRule] = Field(default_factory=list)
    """Per-model price rules; the first rule whose ``model`` (exact or glob) matches wins."""
    default_estimate_seconds: float = Field(30.0, gt=0)
    """GPU seconds reserved up front for one request (the unused part is released)."""
    max_estimate_seconds: float = Field(600.0, gt=0)
    """Upper bound of any single request's reservation, in GPU seconds."""
    learn_estimates: bool = True
    """Learn each model's prefill/decode speed and typical answer length from completed
    requests, and estimate from them instead of ``default_estimate_seconds``."""
    estimate_safety_factor: float = Field(1.25, ge=1.0, le=10.0)
    """Learned estimates are multiplied by this (over-estimates are released at commit)."""
    degrade_to_fit: bool = True
    """When the budget cannot pay the estimate but pays a useful answer, reserve what is left
    and cap the answer's length (``num_predict`` / ``max_tokens``) instead of refusing."""
    degrade_min_tokens: int = Field(16, ge=1)
    """The shortest answer worth giving when degrading; below it the request is refused."""
    gpu_time: str = "auto"
    """``auto``: bill the upstream's reported compute time when present, else wall time;
    ``reported``: only reported time; ``wall``: always the wall time measured by the proxy."""

    # --- authority and its failures -----------------------------------------------------------
    cycles_base_url: str | None = Field(
        None, validation_alias=AliasChoices("CYCLES_BASE_URL", "cycles_base_url")
    )
    """Remote Cycles server; when set it replaces the embedded ledger as the budget authority."""
    cycles_api_key: str | None = Field(
        None, validation_alias=AliasChoices("CYCLES_API_KEY", "cycles_api_key")
    )
    """Cycles API key used for tenants without a key of their own in ``cycles_tenant_keys``."""
    cycles_tenant_keys: dict[str, str] = Field(default_factory=dict)
    """Tenant name -> that tenant's Cycles API key (the Cycles server scopes keys to tenants)."""
    cycles_key_passthrough: bool = False
    """Treat the caller's own key as a Cycles API key; the Cycles server decides the tenant."""
    failure_policy: FailurePolicy = FailurePolicy.FAIL_CLOSED
    """When the authority is unreachable: fail_closed (503), fail_open (run, settle later),
    or shadow (never block; would-be denials are only logged)."""
    cycles_deadline_s: float = Field(5.0, gt=0)
    """Total time one reserve/release/balances call may take, retries included."""
    cycles_settle_deadline_s: float = Field(15.0, gt=0)
    """Total time one commit may take, retries included, before it is journaled for later."""
    cycles_connect_timeout_s: float = Field(2.0, gt=0)
    cycles_read_timeout_s: float = Field(5.0, gt=0)
    journal_dir: Path | None = None
    """Where undeliverable spend is journaled (default: next to the ledger file)."""

    # --- request handling ------------------------------------------------------------------------
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Largest metered request body accepted (413 beyond). Pass-through bodies are streamed."""
    require_key_for_passthrough: bool = True
    """Unmetered routes (``/api/tags``, ...) also need a key (``/`` and ``/api/version`` never)."""

    # --- operations ----------------------------------------------------------------------------
    admin_host: str = "127.0.0.1"
    """Address of the operational listener (metrics, health, status page)."""
    admin_port: int | None = Field(11439, ge=0, le=65535)
    """Port of the operational listener; unset to disable it."""
    access_log: bool = True
    """Write one JSON line per request to stderr."""
    log_level: str = "INFO"

    @field_validator("upstream", "cycles_base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
        return v

    @field_validator("default_price_per_gpu_second", mode="before")
    @classmethod
    def _price(cls, v: Any) -> int:
        return parse_amount(v, per_second=True)

    @field_validator("gpu_time")
    @classmethod
    def _gpu_time(cls, v: str) -> str:
        if v not in ("auto", "reported", "wall"):
            raise ValueError("must be auto, reported or wall")
        return v

    @field_validator("db_synchronous")
    @classmethod
    def _sync(cls, v: str) -> str:
        v = v.upper()
        if v not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError("must be NORMAL, FULL, EXTRA or OFF")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_estimate_seconds < self.default_estimate_seconds:
            raise ValueError("max_estimate_seconds must be >= default_estimate_seconds")
        return self

    @property
    def remote(self) -> bool:
        return bool(self.cycles_base_url)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get("path")
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


_CONFIG_FILE: dict[str, Path | None] = {}


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from flags (``overrides``, None values ignored), environment and a TOML file."""
    path = config or os.environ.get("CYCLES_PROXY_CONFIG")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        _CONFIG_FILE["path"] = p
    else:
        _CONFIG_FILE["path"] = None
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _CONFIG_FILE.pop("path", None)
