"""What every request handler shares: the settings, the profile registry, the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .config import ServerConfig
from .engine import Engine
from .registry import Registry


@dataclass
class AppState:
    config: ServerConfig
    registry: Registry
    engine: Engine
    api_keys: list[bytes] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    leases: object | None = None  # server.leases.FileLeases, when taken
