"""Helpers for native unit tests of a plugin: encode events as the host does
and run the folds without a component.

    from refold_sdk.testing import run_fold
    state = run_fold(Bank(), None, [("e1", "account.opened", {"owner": "ada"})])
"""

import json

from . import core

__all__ = ["Span", "Header", "batch", "run_fold", "run_project"]


class Span:
    """A span of the batch's bytes (as the WIT ``span``)."""

    __slots__ = ("offset", "len")

    def __init__(self, offset, len):
        self.offset = offset
        self.len = len

    def __repr__(self):
        return "Span(%d, %d)" % (self.offset, self.len)


class Header:
    """One event header (as the WIT ``event-header``)."""

    __slots__ = ("id", "event_type", "source", "time", "data", "position")

    def __init__(self, id, event_type, source, time, data, position):
        self.id = id
        self.event_type = event_type
        self.source = source
        self.time = time
        self.data = data
        self.position = position

    def copy(self, **changes):
        h = Header(self.id, self.event_type, self.source, self.time, self.data, self.position)
        for k, v in changes.items():
            setattr(h, k, v)
        return h


def batch(events):
    """``(bytes, headers)`` of an event batch, encoded as the host does.

    Each event is ``(id, type, data)`` or ``(id, type, data, time)``; ``data``
    is a JSON value, or ``bytes``/``str`` taken as raw JSON text (``b""``
    for absent data). Source is ``/test``, positions are 1, 2, ...
    """
    buf = bytearray()

    def span(text):
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        s = Span(len(buf), len(raw))
        buf.extend(raw)
        return s

    headers = []
    for i, e in enumerate(events):
        id, ty, data = e[0], e[1], e[2]
        time = e[3] if len(e) > 3 else None
        if not isinstance(data, (bytes, str)):
            data = json.dumps(data, separators=(",", ":"))
        id_s = span(id)
        ty_s = span(ty)
        src_s = span("/test")
        time_s = None if time is None else span(time)
        data_s = span(data)
        headers.append(Header(id_s, ty_s, src_s, time_s, data_s, i + 1))
    return bytes(buf), headers


def _state_bytes(plugin, state, entity_id):
    if state is None:
        return core.init(plugin, entity_id)
    if isinstance(state, (bytes, bytearray)):
        return bytes(state)
    return core.encode_json(state)


def run_fold(plugin, state, events, entity_id="e-1"):
    """Fold ``events`` (see :func:`batch`) onto ``state`` (a JSON value,
    JSON bytes, or None for ``init``) as the component would; returns the
    decoded new state or raises :class:`refold_sdk.core.Failure`."""
    data, headers = batch(events)
    out = core.fold(plugin, _state_bytes(plugin, state, entity_id), data, headers)
    return json.loads(out)


def run_project(plugin, before, after, events, entity_id="e-1"):
    """``project`` as the component would; returns the ops as
    ``("upsert", projection, key, body)`` (body decoded) and ``("delete",
    projection, key)`` tuples."""
    data, headers = batch(events)
    ops = core.project(
        plugin,
        entity_id,
        _state_bytes(plugin, before, entity_id),
        _state_bytes(plugin, after, entity_id),
        data,
        headers,
    )
    return [
        (op[0], op[1], op[2], json.loads(op[3])) if op[0] == "upsert" else op for op in ops
    ]
