"""The top-level package exposes the public API, and every exception has the one root."""

from __future__ import annotations

import builtins
import inspect

import geventpool
from geventpool import errors


def test_every_public_name_is_importable_from_the_package() -> None:
    for name in geventpool.__all__:
        assert getattr(geventpool, name) is not None, name


def test_every_error_derives_from_the_one_root_and_none_shadows_a_builtin() -> None:
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    ]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, geventpool.GeventPoolError) and cls.__name__.endswith("Error")
        assert not hasattr(builtins, cls.__name__)  # e.g. no TimeoutError, ConnectionError
