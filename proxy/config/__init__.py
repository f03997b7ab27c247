"""The proxy's configuration, loaded from YAML or JSON: `load_config(path)` or
`parse_config(document)` give a frozen `Config`, or raise `ConfigError`.

`schema.py` holds what a file may say (every key, type, bound and default, as pydantic
models); `loader.py` expands `${VAR}`, reports errors by file and key path, and builds the
`Config` the rest of the proxy reads.
"""

from proxy.config.loader import (
    SECRET_KEYS,
    Config,
    ConfigError,
    InstanceConfig,
    ModelGroup,
    instance_ids,
    is_local_host,
    load_config,
    parse_config,
    split_base_url,
)
from proxy.config.schema import (
    BALANCES,
    CAPABILITIES,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_STORE_URL,
    KINDS,
    SERVER_KINDS,
    AffinityConfig,
    CostSpec,
    DocumentSpec,
    GroupSpec,
    HealthConfig,
    InstanceSpec,
    LoggingConfig,
    MetadataSpec,
    PinSpec,
    ProviderSpec,
    RetryConfig,
    RoutingConfig,
    ServerConfig,
    StateConfig,
    StoreConfig,
    TimeoutsConfig,
    TlsConfig,
    UpstreamConfig,
    Weights,
)

__all__ = [
    "AffinityConfig", "BALANCES", "CAPABILITIES", "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_STORE_URL", "KINDS", "SECRET_KEYS",
    "SERVER_KINDS", "Config", "ConfigError", "CostSpec", "DocumentSpec", "GroupSpec",
    "HealthConfig", "InstanceConfig", "InstanceSpec", "LoggingConfig", "MetadataSpec",
    "ModelGroup", "PinSpec", "ProviderSpec", "RetryConfig", "RoutingConfig", "ServerConfig",
    "StateConfig", "StoreConfig", "TimeoutsConfig", "TlsConfig", "UpstreamConfig", "Weights", "instance_ids",
    "is_local_host", "load_config", "parse_config", "split_base_url",
]
