"""API keys -> tenants, and per-tenant quotas, from a YAML key file.

    keys:
      sk-team-a: {tenant: team-a}
      sk-ops:    {tenant: ops, admin: true}
    tenants:
      team-a: {quota: 50GiB}

Without a key file the daemon runs open (for loopback development): one tenant, ``default``,
with admin rights. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
import yaml

from kvstore.config import parse_size
from kvstore.errors import ConfigError


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False


@dataclass
class KeyFile:
    keys: dict[str, Principal] = field(default_factory=dict)
    quotas: dict[str, int] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @classmethod
    def load(cls, path: str | None) -> "KeyFile":
        if not path:
            return cls()
        try:
            data = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read key file {path}: {exc}") from exc
        if not isinstance(data, dict) or set(data) - {"keys", "tenants"}:
            raise ConfigError(f"key file {path}: top level must have only 'keys' and 'tenants'")
        keys: dict[str, Principal] = {}
        for key, spec in (data.get("keys") or {}).items():
            if not isinstance(spec, dict) or not spec.get("tenant") or set(spec) - {"tenant", "admin"}:
                raise ConfigError(f"key file {path}: each key needs {{tenant: NAME, admin: bool?}}")
            keys[str(key)] = Principal(str(spec["tenant"]), bool(spec.get("admin", False)))
        quotas = {}
        for tenant, spec in (data.get("tenants") or {}).items():
            if not isinstance(spec, dict) or set(spec) - {"quota"}:
                raise ConfigError(f"key file {path}: tenants.{tenant} takes only 'quota'")
            if spec.get("quota") is not None:
                quotas[str(tenant)] = parse_size(spec["quota"], f"tenants.{tenant}.quota")
        return cls(keys, quotas)

    def authenticate(self, header: str | None) -> Principal | None:
        if not self.enabled:
            return Principal("default", admin=True)
        if not header or not header.startswith("Bearer "):
            return None
        given = header[len("Bearer "):].strip().encode()
        found = None
        for key, principal in self.keys.items():
            if hmac.compare_digest(key.encode(), given):
                found = principal
        return found


def storage_key(tenant: str, key: bytes) -> bytes:
    """Where a tenant's chunk lives: a tenant cannot name (or probe) another tenant's objects."""
    return xxhash.xxh3_128_digest(b"kvstore-tenant\0" + tenant.encode() + b"\0" + key)
