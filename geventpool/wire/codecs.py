"""The transports and protocols geventpool speaks: the names a registry may carry.

Both sides frame and head messages themselves (:mod:`geventpool.wire.messages`); structs go
through thriftpy2's codecs: the Cython binary protocol (several times faster than the pure
Python one) or the compact protocol.
"""

from __future__ import annotations

TRANSPORTS = frozenset({"buffered", "framed"})
PROTOCOLS = frozenset({"binary", "compact"})
