"""Whether something listens at an address, asked before a client that retries for minutes is
pointed at it: Ray's connection to a cluster's head and MLflow's requests to a tracking server both
retry an address where nothing listens for minutes, then end in a traceback."""
from __future__ import annotations

import socket

from pipeline.config import ConfigError

TIMEOUT_S = 10.0


def check_listening(host: str, port: int, where: str, address: str, hint: str, timeout: float = TIMEOUT_S) -> None:
    """Refuse in one line, "WHERE: nothing answers at ADDRESS (why); HINT", a `host` that accepts no
    connection at `port` within `timeout` seconds (`address`: the two as the user gave them)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        why = f"no answer in {timeout:g} s" if isinstance(err, TimeoutError) else err.strerror or type(err).__name__
        raise ConfigError(f"{where}: nothing answers at {address} ({why}); {hint}") from None
