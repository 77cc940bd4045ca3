"""Settings under Celery's names, typed and checked.

An unknown or misspelt name is a ``ConfigurationError`` that suggests the closest known name.
Celery settings that aioqueue knows but does not implement are accepted and reported once in
the log, so a ``celeryconfig.py`` written for stock Celery loads unchanged and nothing is
silently ignored.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any

from .exceptions import ConfigurationError
from .registry import mask_password

__all__ = ("QUEUE_TYPES", "Queue", "Settings")

#: Values of ``task_default_queue_type`` / ``task_create_missing_queue_type`` (RabbitMQ's
#: ``x-queue-type``; other brokers take the arguments and emulate what they mean).
QUEUE_TYPES = ("classic", "quorum")

logger = logging.getLogger(__name__)

#: The default of ``fast_paths``. The worker CLI sets it from ``AIOQUEUE_FAST_PATHS``; the
#: test suite from the same variable, to run once with the fast paths off.
fast_paths_default = True


@dataclass(frozen=True, slots=True)
class Queue:
    """A queue and how it is bound, as kombu's ``Queue`` describes it.

    By default a queue is durable and bound to a direct exchange of its own name with its
    name as routing key, which is how Celery declares queues it creates.
    """

    name: str
    exchange: str | None = None
    exchange_type: str = "direct"
    routing_key: str | None = None
    durable: bool = True
    auto_delete: bool = False
    queue_arguments: Mapping[str, Any] = field(default_factory=dict)

    @property
    def exchange_name(self) -> str:
        return self.name if self.exchange is None else self.exchange

    @property
    def binding_key(self) -> str:
        return self.name if self.routing_key is None else self.routing_key


# Every other Celery 5.x setting name: recognised, accepted and reported, not implemented (yet).
UNSUPPORTED_CELERY_SETTINGS = frozenset(
    {
        "arangodb_backend_settings", "azureblockblob_base_path",
        "azureblockblob_connection_timeout", "azureblockblob_container_name",
        "azureblockblob_read_timeout", "azureblockblob_retry_increment_base",
        "azureblockblob_retry_initial_backoff_sec", "azureblockblob_retry_max_attempts",
        "beat_cron_starting_deadline", "beat_enable_remote_control",
        "beat_max_loop_interval", "beat_remote_control_max_tick_age", "beat_schedule",
        "beat_schedule_filename", "beat_scheduler", "beat_sync_every",
        "broker_channel_error_retry", "broker_connection_max_retries",
        "broker_connection_retry", "broker_failover_strategy", "broker_heartbeat",
        "broker_heartbeat_checkrate", "broker_host", "broker_login_method",
        "broker_native_delayed_delivery_queue_type", "broker_password",
        "broker_pool_acquire_timeout", "broker_pool_limit", "broker_port",
        "broker_read_url", "broker_transport", "broker_use_ssl", "broker_user",
        "broker_vhost", "broker_write_url", "cache_backend", "cache_backend_options",
        "cassandra_auth_kwargs", "cassandra_auth_provider", "cassandra_bundle_path",
        "cassandra_entry_ttl", "cassandra_keyspace", "cassandra_options", "cassandra_port",
        "cassandra_read_consistency", "cassandra_servers", "cassandra_table",
        "cassandra_write_consistency", "control_exchange", "control_queue_durable",
        "control_queue_exclusive", "control_queue_expires", "control_queue_ttl",
        "cosmosdbsql_collection_name", "cosmosdbsql_consistency_level",
        "cosmosdbsql_database_name", "cosmosdbsql_max_retry_attempts",
        "cosmosdbsql_max_retry_wait_time", "couchbase_backend_settings",
        "database_create_tables_at_setup", "database_engine_callback",
        "database_engine_options", "database_short_lived_sessions", "database_table_names",
        "database_table_schemas", "database_url", "elasticsearch_max_retries",
        "elasticsearch_retry_on_timeout", "elasticsearch_save_meta_as_text",
        "elasticsearch_timeout", "event_exchange", "event_queue_durable",
        "event_queue_exclusive", "event_queue_expires", "event_queue_prefix",
        "event_queue_ttl", "event_serializer", "gcs_base_path", "gcs_bucket", "gcs_project",
        "gcs_ttl", "imports", "include", "mongodb_backend_settings",
        "redis_backend_health_check_interval", "redis_backend_use_ssl", "redis_db",
        "redis_host", "redis_max_connections", "redis_password", "redis_port",
        "redis_retry_on_timeout", "redis_socket_connect_timeout", "redis_socket_keepalive",
        "redis_socket_timeout", "redis_username", "result_backend_always_retry",
        "result_backend_base_sleep_between_retries_ms", "result_backend_max_retries",
        "result_backend_max_sleep_between_retries_ms", "result_cache_max",
        "result_chord_expires", "result_chord_join_timeout", "result_chord_retry_interval",
        "result_compression", "result_exchange", "result_exchange_type",
        "result_failure_expires", "result_persistent", "s3_access_key_id", "s3_base_path",
        "s3_bucket", "s3_endpoint_url", "s3_region", "s3_secret_access_key",
        "security_cert_store", "security_certificate", "security_digest", "security_key",
        "security_key_password", "task_acks_on_failure", "task_acks_on_failure_or_timeout",
        "task_acks_on_timeout", "task_allow_error_cb_on_chord_header", "task_annotations",
        "task_create_missing_queue_exchange_type", "task_create_missing_queues",
        "task_default_delivery_mode", "task_default_exchange_type", "task_default_rate_limit",
        "task_inherit_parent_priority", "task_protocol", "task_publish_retry",
        "task_publish_retry_policy", "task_reject_on_worker_lost", "task_remote_tracebacks",
        "task_repr_maxlevels", "task_retry_on_worker_lost", "task_send_sent_event",
        "task_store_eager_result", "task_store_errors_even_if_ignored", "worker_agent",
        "worker_autoscaler", "worker_cancel_long_running_tasks_on_connection_loss",
        "worker_consumer", "worker_deduplicate_successful_tasks",
        "worker_detect_quorum_queues", "worker_direct", "worker_disable_prefetch",
        "worker_disable_rate_limits", "worker_enable_prefetch_count_reduction",
        "worker_enable_remote_control", "worker_enable_soft_shutdown_on_idle",
        "worker_eta_task_limit", "worker_hijack_root_logger", "worker_log_color",
        "worker_log_datefmt", "worker_log_format", "worker_lost_wait",
        "worker_max_memory_per_child", "worker_max_tasks_per_child", "worker_pool",
        "worker_pool_putlocks", "worker_pool_restarts", "worker_pool_start_method",
        "worker_proc_alive_timeout", "worker_redirect_stdouts",
        "worker_redirect_stdouts_level", "worker_send_task_events",
        "worker_soft_shutdown_timeout", "worker_state_db", "worker_task_log_datefmt",
        "worker_task_log_format", "worker_timer", "worker_timer_precision",
    }
)


def _seconds(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            f"{name} must be a number of seconds or a timedelta, got {_shown(value)}"
        )
    return float(value)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {_shown(value)}")
    return value


def _string_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{name} must be a list of strings, got {_shown(value)}")
    return list(value)


#: What a censored view hides: settings and option keys whose name matches (Celery's rule);
#: the passwords and tokens of URLs are masked wherever they appear (``mask_password``).
SECRET_NAME = re.compile(r"API|TOKEN|KEY|SECRET|PASS|PROFANITIES_LIST|SIGNATURE|DATABASE", re.I)
MASK = "********"


def censor(value: Any, name: str = "") -> Any:
    """``value`` safe to print: secret-named entries masked, URLs without passwords.

    Looks into dicts (by key), lists, tuples and sets; a secret ``name`` masks the whole
    value unless it is None.
    """
    if name and value is not None and SECRET_NAME.search(name):
        return MASK
    if isinstance(value, str):
        return mask_password(value)
    if isinstance(value, Mapping):
        return {k: censor(v, k if isinstance(k, str) else "") for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return type(value)(censor(v) for v in value)
    return value


def _shown(value: Any) -> str:
    """``repr(value)`` for error messages, with its secrets masked."""
    try:
        return repr(censor(value))
    except Exception:
        return mask_password(value)


@dataclass(slots=True, repr=False)
class Settings:
    """``app.conf``: every setting aioqueue reads, with Celery's names and defaults.

    Differences from Celery's defaults are deliberate and documented:
    ``task_acks_late`` is True (nothing is lost when a worker dies) and
    ``worker_concurrency`` is 100 (coroutines, not processes).
    """

    broker_url: str | None = None
    result_backend: str | None = None
    broker_connection_timeout: float = 4.0
    broker_publish_timeout: float | None = 10.0  # for the broker to take a message (confirm)
    broker_connection_retry_on_startup: bool = True
    broker_transport_options: dict[str, Any] = field(default_factory=dict)
    result_backend_transport_options: dict[str, Any] = field(default_factory=dict)
    task_serializer: str = "json"
    result_serializer: str = "json"
    accept_content: list[str] = field(default_factory=lambda: ["json"])
    result_accept_content: list[str] | None = None
    task_compression: str | None = None
    timezone: str = "UTC"
    enable_utc: bool = True
    task_default_queue: str = "celery"
    task_default_exchange: str | None = None  # None: named after task_default_queue
    task_default_routing_key: str | None = None  # None: task_default_queue
    task_default_priority: int | None = None
    task_queue_max_priority: int | None = None
    task_queues: list[Queue] | None = None
    task_routes: Any = None
    task_default_queue_type: str = "classic"  # of task_default_queue ("classic" or "quorum")
    task_create_missing_queue_type: str = "classic"  # of queues created on the fly
    task_queue_delivery_limit: int | None = None  # quorum x-delivery-limit; None: 20 with a DLQ
    task_dead_letter_queue: str | None = None  # where rejected/expired/over-limit tasks go
    broker_delay_threshold: float | None = 60.0  # ETAs further away wait in the broker
    task_acks_late: bool = True
    task_ignore_result: bool = False
    task_track_started: bool = False
    task_time_limit: float | None = None
    task_soft_time_limit: float | None = None
    task_always_eager: bool = False
    task_eager_propagates: bool = False
    result_expires: float | None = 86400.0
    result_extended: bool = False
    worker_concurrency: int = 100
    worker_prefetch_multiplier: int = 4
    worker_shutdown_timeout: float = 10.0
    # What one message may make the worker allocate (docs/reliability.md, "Hostile input").
    worker_max_message_size: int = 64 << 20  # body bytes as received
    worker_max_decompressed_size: int = 64 << 20  # body bytes once inflated
    worker_max_header_count: int = 256  # header entries, nested ones included
    worker_max_header_size: int = 1 << 20  # bytes of header keys and values
    worker_max_body_depth: int = 64  # nesting of lists/dicts in the decoded body
    # aioqueue's own wire code on its own connections (docs/design.md, "What we rely on in
    # our dependencies"); False: the dependencies' public API only.
    fast_paths: bool = field(default_factory=lambda: fast_paths_default)
    unsupported: dict[str, Any] = field(default_factory=dict)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "unsupported":  # bookkeeping, set once by __init__
            object.__setattr__(self, name, value)
        elif name in _FIELD_NAMES:
            object.__setattr__(self, name, _check(name, value))
        else:
            self.update({name: value})

    def __getitem__(self, name: str) -> Any:
        if name not in _FIELD_NAMES:
            raise KeyError(name)
        return getattr(self, name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.update({name: value})

    def get(self, name: str, default: Any = None) -> Any:
        if name in _FIELD_NAMES:
            return getattr(self, name)
        return self.unsupported.get(name, default)

    def update(self, mapping: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        """Set several settings at once; checks every name before changing any."""
        items = {**(mapping or {}), **settings}
        checked: dict[str, Any] = {}
        for name, value in items.items():
            if name in UNSUPPORTED_CELERY_SETTINGS:
                if name not in self.unsupported:
                    logger.warning(
                        "setting %r is a Celery setting aioqueue does not implement; it is "
                        "ignored (see docs/configuration.md)", name,
                    )
                self.unsupported[name] = value
                continue
            if name not in _FIELD_NAMES:
                raise _unknown(name)
            checked[name] = _check(name, value)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def from_object(self, obj: Any) -> None:
        """Load settings from a module, a module name (``"celeryconfig"``), or any object."""
        if isinstance(obj, str):
            module_name, _, attr = obj.partition(":")
            try:
                obj = importlib.import_module(module_name)
            except ImportError as exc:
                raise ConfigurationError(
                    f"cannot import configuration module {obj!r}: {exc}"
                ) from exc
            if attr:
                obj = getattr(obj, attr)
        if isinstance(obj, Mapping):
            source = dict(obj)
        else:
            source = {
                name: getattr(obj, name)
                for name in dir(obj)
                if not name.startswith("_") and name.islower()
                and not inspect.ismodule(getattr(obj, name))
                and not inspect.isclass(getattr(obj, name))
                and not inspect.isroutine(getattr(obj, name))
            }
        self.update(source)

    @property
    def exchange(self) -> str:
        return self.task_default_exchange or self.task_default_queue

    @property
    def routing_key(self) -> str:
        return self.task_default_routing_key or self.task_default_queue

    def as_dict(self) -> dict[str, Any]:
        """Every implemented setting's real value, secrets included: for code, not for print."""
        return {name: getattr(self, name) for name in sorted(_FIELD_NAMES)}

    def table(self, with_defaults: bool = False, censored: bool = True) -> dict[str, Any]:
        """The settings as a dict, as Celery's ``app.conf.table()``.

        ``with_defaults=False``: only the settings changed from their defaults (and every
        accepted Celery setting aioqueue does not implement). ``censored=True``: secrets
        masked as ``censor`` does; pass ``censored=False`` only to see them.
        """
        defaults = Settings() if not with_defaults else None
        table: dict[str, Any] = {}
        for name in sorted(_FIELD_NAMES):
            value = getattr(self, name)
            if defaults is not None and value == getattr(defaults, name):
                continue
            table[name] = value
        table.update(sorted(self.unsupported.items()))
        if censored:
            return {name: censor(value, name) for name, value in table.items()}
        return table

    def humanize(self, with_defaults: bool = False, censored: bool = True) -> str:
        """``table()`` as text, one ``name: value`` line a setting, as Celery's ``humanize()``."""
        table = self.table(with_defaults=with_defaults, censored=censored)
        return "\n".join(f"{name}: {value!r}" for name, value in table.items())

    def __repr__(self) -> str:
        shown = [
            f"{f.name}={censor(getattr(self, f.name), f.name)!r}"
            for f in fields(self)
            if f.name != "unsupported"
        ]
        if self.unsupported:
            shown.append(f"unsupported={censor(self.unsupported)!r}")
        return f"Settings({', '.join(shown)})"


_FIELD_NAMES = frozenset(f.name for f in fields(Settings)) - {"unsupported"}


def _unknown(name: str) -> ConfigurationError:
    import difflib  # only on this error: not held by every process

    close = difflib.get_close_matches(name, sorted(_FIELD_NAMES | UNSUPPORTED_CELERY_SETTINGS), 1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigurationError(f"unknown setting {name!r}{hint}")


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {_shown(value)}")
    return value


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(
            f"{name} must be a non-negative integer or None, got {_shown(value)}"
        )
    return value


def _queues(value: Any, name: str) -> list[Queue] | None:
    if value is None:
        return None
    queues = [_as_queue(v, name) for v in value]
    return queues


def _as_queue(value: Any, name: str) -> Queue:
    """A queue name, an ``aioqueue.Queue``, or a kombu ``Queue`` from a Celery config."""
    if isinstance(value, Queue):
        return value
    if isinstance(value, str):
        return Queue(value)
    exchange = getattr(value, "exchange", None)
    if isinstance(getattr(value, "name", None), str) and exchange is not None:
        # Read kombu's Queue by its attributes (kombu itself is not imported here).
        return Queue(
            value.name,
            exchange=getattr(exchange, "name", None),
            exchange_type=getattr(exchange, "type", None) or "direct",
            routing_key=getattr(value, "routing_key", None) or None,
            durable=bool(getattr(value, "durable", True)),
            auto_delete=bool(getattr(value, "auto_delete", False)),
            queue_arguments=dict(getattr(value, "queue_arguments", None) or {}),
        )
    raise ConfigurationError(
        f"{name} must hold aioqueue.Queue objects, kombu Queues or queue names; got {_shown(value)}"
    )


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string or None, got {_shown(value)}")
    return value


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(choices)}, got {_shown(value)}")
    return str(value)


def _optional_queue_name(value: Any, name: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigurationError(f"{name} must be a queue name or None, got {_shown(value)}")
    return value


def _non_negative_seconds(value: Any, name: str) -> float | None:
    seconds = _seconds(value, name)
    if seconds is not None and seconds < 0:
        raise ConfigurationError(f"{name} must not be negative, got {_shown(value)}")
    return seconds


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string, got {_shown(value)}")
    return value


def _serializer(value: Any, name: str) -> str:
    from .serialization import SERIALIZERS

    if value not in SERIALIZERS:
        raise ConfigurationError(
            f"{name} must be one of {', '.join(sorted(SERIALIZERS))}, got {_shown(value)}"
        )
    return str(value)


def _content_types(value: Any, name: str) -> list[str]:
    from .serialization import SERIALIZERS

    items = _string_list(value, name)
    for item in items:
        if item not in SERIALIZERS and "/" not in item:
            raise ConfigurationError(
                f"{name}: {item!r} is neither a serializer name "
                f"({', '.join(sorted(SERIALIZERS))}) nor a MIME type"
            )
    return items


def _routes(value: Any, name: str) -> Any:
    routers = value if isinstance(value, list | tuple) else [value]
    if value is not None and not all(isinstance(r, Mapping) or callable(r) for r in routers):
        raise ConfigurationError(
            f"{name} must be a dict, a callable, or a list of them, got {_shown(value)}"
        )
    return value


def _dict(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{name} must be a dict, got {_shown(value)}")
    return dict(value)


_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "broker_url": _optional_str,
    "result_backend": _optional_str,
    "broker_connection_timeout": _seconds,
    "broker_publish_timeout": _seconds,
    "broker_connection_retry_on_startup": _check_bool,
    "broker_transport_options": _dict,
    "result_backend_transport_options": _dict,
    "task_serializer": _serializer,
    "result_serializer": _serializer,
    "accept_content": _content_types,
    "result_accept_content": lambda v, n: None if v is None else _content_types(v, n),
    "task_compression": _optional_str,
    "timezone": _str,
    "enable_utc": _check_bool,
    "task_default_queue": _str,
    "task_default_exchange": _optional_str,
    "task_default_routing_key": _optional_str,
    "task_default_priority": _optional_int,
    "task_queue_max_priority": _optional_int,
    "task_queues": _queues,
    "task_routes": _routes,
    "task_default_queue_type": lambda v, n: _choice(v, n, QUEUE_TYPES),
    "task_create_missing_queue_type": lambda v, n: _choice(v, n, QUEUE_TYPES),
    "task_queue_delivery_limit": _optional_int,
    "task_dead_letter_queue": _optional_queue_name,
    "broker_delay_threshold": _non_negative_seconds,
    "task_acks_late": _check_bool,
    "fast_paths": _check_bool,
    "task_ignore_result": _check_bool,
    "task_track_started": _check_bool,
    "task_time_limit": _seconds,
    "task_soft_time_limit": _seconds,
    "task_always_eager": _check_bool,
    "task_eager_propagates": _check_bool,
    "result_expires": _seconds,
    "result_extended": _check_bool,
    "worker_concurrency": _positive_int,
    "worker_prefetch_multiplier": _positive_int,
    "worker_shutdown_timeout": _seconds,
    "worker_max_message_size": _positive_int,
    "worker_max_decompressed_size": _positive_int,
    "worker_max_header_count": _positive_int,
    "worker_max_header_size": _positive_int,
    "worker_max_body_depth": _positive_int,
}


def _check(name: str, value: Any) -> Any:
    check = _CHECKS.get(name)
    return check(value, name) if check else value
