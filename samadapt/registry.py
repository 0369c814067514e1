"""Plugins found by name: backbones, methods and readers register here, all in one style.

A registered thing is a class that declares its own name as a class attribute, and registers with the registry's
``register`` used as a plain decorator:

    @BACKBONES.register                 # a ``Backbone`` subclass; built with ``cls.build(checkpoint=..., ...)``
    class MyBackbone(Backbone):
        name = "my_backbone"

    @METHODS.register                   # a ``Method`` subclass; built with ``cls(backbone, config, num_classes)``
    class MyMethod(Method):
        name = "my_method"

    @READERS.register                   # a ``DatasetSource`` subclass; built with ``cls(path, modality=None)``
    class MySource(DatasetSource):
        format = "my_format"            # readers are named by ``format``, the value of ``data.format``

Third-party packages add their own through the entry-point groups ``samadapt.backbones``, ``samadapt.methods`` and
``samadapt.readers``: each entry point names a module or object whose import registers its classes as above. The
groups are loaded the first time a name is not found among the built-ins, or when the names are listed.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """A name -> class table with helpful errors for unknown names.

    ``base``: the class every registered class must subclass; ``name_attr``: the class attribute holding its name.
    """

    def __init__(self, kind: str, entry_point_group: str, base: type, name_attr: str = "name"):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.base = base
        self.name_attr = name_attr
        self._items: dict[str, T] = {}
        self._plugins_loaded = False

    def register(self, cls: T) -> T:
        """Class decorator: add ``cls`` under its declared name (``cls.<name_attr>``); returns ``cls``."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise ConfigError(f"{self.kind} registration takes a {self.base.__name__} subclass that declares its "
                              f"{self.name_attr!r} (use @register on the class), got {cls!r}")
        name = getattr(cls, self.name_attr)
        if not isinstance(name, str) or name == getattr(self.base, self.name_attr, None):
            raise ConfigError(f"{self.kind} class {cls.__name__} declares no {self.name_attr!r} of its own")
        if name in self._items and self._items[name] is not cls:
            raise ConfigError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = cls
        return cls

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            ep.load()

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_plugins()
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
