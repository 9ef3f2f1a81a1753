"""The top-level package exposes the public API, and every exception has the one root."""

from __future__ import annotations

import builtins
import importlib
import inspect
import pkgutil
from types import ModuleType

import geventpool


def test_every_public_name_is_importable_from_the_package() -> None:
    for name in geventpool.__all__:
        assert getattr(geventpool, name) is not None, name


def every_module() -> list[ModuleType]:
    """Every module of the package, imported (sub-packages included)."""
    names = [info.name for info in pkgutil.walk_packages(geventpool.__path__, "geventpool.")]
    assert "geventpool.alerts.channels" in names and "geventpool.wire.codecs" in names
    return [importlib.import_module(name) for name in names]


def exceptions_defined_in(modules: list[ModuleType]) -> list[type[BaseException]]:
    """Every exception class defined (not merely imported) by one of ``modules``."""
    return [
        cls
        for module in modules
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__ == module.__name__ and issubclass(cls, BaseException)
    ]


def test_every_error_derives_from_the_one_root_and_none_shadows_a_builtin() -> None:
    classes = exceptions_defined_in(every_module())
    assert len(classes) >= 17
    assert {"DeliveryError", "ZooKeeperNotFoundError"} <= {c.__name__ for c in classes}
    for cls in classes:
        where = f"{cls.__module__}.{cls.__qualname__}"
        assert issubclass(cls, geventpool.GeventPoolError), where
        assert cls.__name__.endswith("Error"), where
        assert not hasattr(builtins, cls.__name__), where  # e.g. no TimeoutError, ConnectionError
