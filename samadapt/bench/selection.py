"""Which methods each benchmark part measures and with which preset, read from the facts each method declares
(``Method.benchmark_parts``, ``Method.presets``) through the registry: no table of method names in bench/."""

from __future__ import annotations

from ..errors import ConfigError
from ..methods import METHODS


def measured_methods(part: str) -> list[str]:
    """Registered methods, sorted by name, that declare ``part`` (``"latency"``, ``"cost"``) in ``benchmark_parts``."""
    return [name for name in METHODS.names() if part in METHODS.get(name).benchmark_parts]


def preset(method: str, purpose: str = "cpu") -> str:
    """The bundled preset ``method`` declares for ``purpose``; ConfigError naming the method when it declares none."""
    presets = METHODS.get(method).presets
    if purpose not in presets:
        raise ConfigError(f"method {method!r} declares no {purpose!r} preset (its presets: "
                          f"{', '.join(f'{k}={v}' for k, v in presets.items()) or 'none'})")
    return presets[purpose]
