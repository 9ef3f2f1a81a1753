"""Telling observers about each call, for the client's attempts and the server's calls alike.

:class:`Observers` holds the observers of one client or one server and tells each of them a
call's start and end, in turn, in the caller's greenlet. An observer that raises loses only
its own record: the call goes on, and the first failure of each observer is told
(``call_observer_failed``). An observer that needs only the ends sets
``observes_starts = False`` and is not called at the starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from geventpool import events

Call = TypeVar("Call")


class Observers(Generic[Call]):
    """The observers of one client or server. ``started`` and ``ended`` name the methods
    they are told through; ``where`` gives the keys that identify a call in the
    ``call_observer_failed`` event. Bound methods are looked up once, here, not per call;
    ``starts`` is false when no observer wants the starts (the caller then skips
    :meth:`started`)."""

    __slots__ = ("_ends", "_failed", "_starts", "_where", "starts")

    def __init__(
        self,
        observers: Iterable[object],
        started: str,
        ended: str,
        where: Callable[[Call], dict[str, Any]],
    ) -> None:
        watching = tuple(observers)
        self._starts: tuple[tuple[object, Callable[..., None]], ...] = tuple(
            (observer, getattr(observer, started))
            for observer in watching
            if getattr(observer, "observes_starts", True)
        )
        self._ends: tuple[tuple[object, Callable[..., None]], ...] = tuple(
            (observer, getattr(observer, ended)) for observer in watching
        )
        self._where = where
        self._failed: set[int] = set()
        self.starts = bool(self._starts)

    def started(self, call: Call) -> None:
        """Tell the observers that want it that ``call`` starts."""
        for observer, started in self._starts:
            try:
                started(call)
            except Exception as failure:  # noqa: BLE001 - an observer never breaks a call
                self._tell(observer, call, failure)

    def ended(self, call: Call, outcome: str, duration: float, error: BaseException | None) -> None:
        """Tell every observer that ``call`` ended with ``outcome`` after ``duration`` s."""
        for observer, ended in self._ends:
            try:
                ended(call, outcome, duration, error)
            except Exception as failure:  # noqa: BLE001
                self._tell(observer, call, failure)

    def _tell(self, observer: object, call: Call, failure: Exception) -> None:
        if id(observer) in self._failed:
            return
        self._failed.add(id(observer))
        events.emit(
            events.CALL_OBSERVER_FAILED,
            "error",
            **self._where(call),
            observer=type(observer).__name__,
            error=f"{failure!r:.200}",
        )


#: Makes a call's record (a NamedTuple) from a tuple of its fields, in a third of the time
#: its constructor takes (a Python function): it runs once per call.
new_record = tuple.__new__
