"""The pure-Python core of the SDK: batch decoding, the fold loop, error
capture and JSON encoding.

Nothing here imports the bindings componentize-py generates, so it runs (and
is unit-tested) on a native CPython. ``refold_sdk.export`` is the only module
that touches the bindings; it calls :func:`fold`, :func:`project`,
:func:`describe` and :func:`init` and converts their results and
:class:`Failure` to the WIT types.
"""

import json
import linecache
import os
import sys
import traceback

__all__ = [
    "Plugin",
    "Event",
    "PluginError",
    "Descriptor",
    "Upsert",
    "Delete",
    "upsert",
    "delete",
    "field",
    "Failure",
    "fold",
    "project",
    "describe",
    "init",
    "encode_json",
    "decode_json",
    "format_exception",
    "I64_MIN",
    "I64_MAX",
    "U64_MAX",
    "MAX_TRACE_BYTES",
]

I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1
U64_MAX = (1 << 64) - 1

#: Upper bound, in UTF-8 bytes, of the message of a plugin error made from an
#: exception (type, message and the innermost frames of its traceback).
MAX_TRACE_BYTES = 4096
#: Frames of plugin code kept in such a message, innermost last.
MAX_TRACE_FRAMES = 6


class PluginError(Exception):
    """Raise it from ``apply`` (or ``project``, ``load_state``) when an event
    cannot be applied: its data does not fit the event's schema, or it breaks
    an invariant. The batch stops there and the host quarantines the entity
    at its state before the event. The message is passed on as it is, with
    no traceback.

    Any other exception does the same, but its message also carries the
    exception's type and the last frames of its traceback.
    """

    def __init__(self, message):
        super().__init__(message)
        self.message = str(message)

    def __str__(self):
        return self.message


class Failure(Exception):
    """A plugin error for the host: event ``event_index`` of the batch (whose
    id is ``event_id``) fails with ``message``. Raised by :func:`fold` and
    :func:`project`; ``refold_sdk.export`` turns it into the WIT
    ``plugin-error``."""

    def __init__(self, event_index, event_id, message):
        super().__init__(event_index, event_id, message)
        self.event_index = event_index
        self.event_id = event_id
        self.message = message

    def __str__(self):
        return "event %d (%s): %s" % (self.event_index, self.event_id, self.message)


class Descriptor:
    """What a plugin says about itself (the WIT ``descriptor``)."""

    __slots__ = ("name", "version", "entity_type", "event_types", "state_schema_version")

    def __init__(self, name, version, entity_type, event_types, state_schema_version):
        self.name = name
        self.version = version
        self.entity_type = entity_type
        self.event_types = list(event_types)
        self.state_schema_version = state_schema_version

    def check(self):
        """Raise ``TypeError`` unless every field has its WIT type."""
        for name in ("name", "version", "entity_type"):
            if not isinstance(getattr(self, name), str):
                raise TypeError("describe: %s must be a str, not %r" % (name, getattr(self, name)))
        if not all(isinstance(t, str) for t in self.event_types):
            raise TypeError("describe: event_types must be strs, not %r" % (self.event_types,))
        v = self.state_schema_version
        if type(v) is not int or not 0 <= v <= 0xFFFFFFFF:
            raise TypeError("describe: state_schema_version must be an int in u32, not %r" % (v,))
        return self

    def __eq__(self, other):
        return isinstance(other, Descriptor) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    def __repr__(self):
        return "Descriptor(%s)" % ", ".join("%s=%r" % (n, getattr(self, n)) for n in self.__slots__)


class Plugin:
    """Base class of a projection plugin: a fold of one entity type's events
    into a state, plus the read-model operations derived from each change.

    Set the class attributes (or override :meth:`describe`), implement
    :meth:`init` and :meth:`apply`, optionally :meth:`project`, and export the
    class with ``WitWorld = refold_sdk.export(MyPlugin)`` in the app module.

    A state is any JSON value (dicts, lists, str, int, float, bool, None);
    the host stores it as compact JSON. One instance serves every call of a
    component instance, and an instance may live for many batches, so keep no
    data on ``self``: everything a fold needs is in the state and the events.
    """

    #: Plugin name, e.g. ``"bank"``.
    name = ""
    #: Plugin version (semver), e.g. ``"1.2.0"``.
    version = "0.0.0"
    #: The one entity type this plugin owns, e.g. ``"account"``.
    entity_type = ""
    #: Event types it understands; others are still passed to ``apply`` and
    #: must leave the state unchanged.
    event_types = ()
    #: Version of the state's JSON schema; bump it when the shape changes.
    state_schema_version = 1

    def describe(self):
        """Who the plugin is and what it owns; from the class attributes by
        default."""
        return Descriptor(
            self.name,
            self.version,
            self.entity_type,
            self.event_types,
            self.state_schema_version,
        )

    def init(self, entity_id):
        """The state of entity ``entity_id`` before its first event."""
        raise NotImplementedError("%s.init" % type(self).__name__)

    def apply(self, state, event):
        """Apply one :class:`Event` to ``state``: return the new state, or
        mutate ``state`` and return None. Raise :class:`PluginError` when the
        event cannot be applied. Event types the plugin does not know must
        leave the state unchanged."""
        raise NotImplementedError("%s.apply" % type(self).__name__)

    def project(self, entity_id, before, after, events):
        """Read-model operations (:func:`upsert`, :func:`delete`) for a batch
        of ``events`` that moved entity ``entity_id`` from state ``before`` to
        ``after``. Defaults to none."""
        return []

    def load_state(self, value):
        """Turn a stored state (the decoded JSON) into the state ``apply``
        and ``project`` get. Raise :class:`PluginError` when it does not have
        this plugin's shape. The default takes it as it is; override it to
        check the shape, fill defaults (a state of an older schema version)
        or fix the key order."""
        return value


# --- JSON -----------------------------------------------------------------


def _reject_constant(name):
    raise ValueError("%s is not JSON" % name)


def decode_json(raw):
    """Decode JSON bytes strictly: UTF-8 only, no ``NaN``/``Infinity``.
    Raises ``ValueError``."""
    text = bytes(raw).decode("utf-8")
    return json.loads(text, parse_constant=_reject_constant)


def encode_json(value):
    """Compact JSON bytes (UTF-8, no spaces, keys in insertion order, no
    ``NaN``). Raises ``TypeError``/``ValueError`` for what is not JSON."""
    return json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


# --- checking JSON values -------------------------------------------------

_MISSING = object()

_EXPECTED = {
    int: "i64",
    str: "a string",
    bool: "a boolean",
    float: "f64",
    dict: "a map",
    list: "a sequence",
}


def _unexpected(value):
    """How serde names a JSON value that has the wrong type."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "boolean `%s`" % ("true" if value else "false")
    if isinstance(value, int):
        return "integer `%d`" % value
    if isinstance(value, float):
        return "floating point `%r`" % value
    if isinstance(value, str):
        return "string %s" % json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "map"
    if isinstance(value, (list, tuple)):
        return "sequence"
    return type(value).__name__


def check(value, kind):
    """Return ``value`` if it is of JSON kind ``kind`` (``int`` meaning an
    integer in i64, not a bool; ``float`` accepting ints too; ``str``,
    ``bool``, ``dict``, ``list``; ``object`` for anything), else raise
    :class:`PluginError` with a serde-like reason."""
    if kind is object:
        return value
    if kind is int:
        if type(value) is int:
            if I64_MIN <= value <= I64_MAX:
                return value
            raise PluginError("invalid value: integer `%d`, expected i64" % value)
    elif kind is float:
        if type(value) is float or type(value) is int:
            return value
    elif kind is bool:
        if value is True or value is False:
            return value
    elif kind in _EXPECTED:
        if type(value) is kind:
            return value
    else:
        raise TypeError("check: unsupported kind %r" % (kind,))
    raise PluginError("invalid type: %s, expected %s" % (_unexpected(value), _EXPECTED[kind]))


def field(obj, name, kind=object, default=_MISSING):
    """``obj[name]`` checked with :func:`check` against ``kind``.

    ``obj`` must be a dict. A missing field is an error unless ``default`` is
    given; with a default, a missing or null field gives the default (like an
    ``Option`` in serde). Raises :class:`PluginError` with a serde-like
    reason, e.g. ``missing field `amount``` or ``invalid type: string
    "12.50", expected i64``.
    """
    if type(obj) is not dict:
        raise PluginError("invalid type: %s, expected a map" % _unexpected(obj))
    value = obj.get(name, _MISSING)
    if default is not _MISSING and (value is _MISSING or value is None):
        return default
    if value is _MISSING:
        raise PluginError("missing field `%s`" % name)
    return check(value, kind)


# --- events ---------------------------------------------------------------


class Event:
    """One event of a batch, as the plugin sees it.

    ``id``, ``type``, ``source`` are str, ``time`` a str (RFC 3339) or None,
    ``position`` the event's position in its entity's history (1, 2, ...).
    ``data`` is the event's JSON data, decoded when first read (None for JSON
    ``null`` or absent data); reading it raises :class:`PluginError` when the
    bytes are not valid JSON. ``data_json`` gives the raw bytes.
    """

    __slots__ = ("id", "type", "source", "time", "position", "_raw", "_data", "_decoded")

    def __init__(self, id, type, data=None, source="", time=None, position=0):
        """An event for tests: ``data`` is a JSON value, encoded now."""
        self.id = id
        self.type = type
        self.source = source
        self.time = time
        self.position = position
        self._raw = encode_json(data)
        self._data = None
        self._decoded = False

    @classmethod
    def from_raw(cls, id, type, source, time, position, raw):
        """An event whose data is JSON bytes (``b""`` meaning null)."""
        self = cls.__new__(cls)
        self.id = id
        self.type = type
        self.source = source
        self.time = time
        self.position = position
        self._raw = raw
        self._data = None
        self._decoded = False
        return self

    @property
    def data_json(self):
        """The data as JSON bytes, ``b"null"`` when absent."""
        return self._raw or b"null"

    @property
    def data(self):
        """The data as a JSON value (dict, list, str, int, float, bool or
        None), decoded once."""
        if not self._decoded:
            if not self._raw:
                value = None
            else:
                try:
                    value = decode_json(self._raw)
                except (ValueError, RecursionError) as e:
                    raise PluginError("data of %s is not valid JSON: %s" % (self.type, e)) from None
            self._data = value
            self._decoded = True
        return self._data

    def field(self, name, kind=object, default=_MISSING):
        """Field ``name`` of the data, checked like :func:`field`; the reason
        is prefixed ``data of TYPE does not fit its schema: ``."""
        try:
            return field(self.data, name, kind, default)
        except PluginError as e:
            if e.message.startswith("data of "):
                raise
            raise PluginError("data of %s does not fit its schema: %s" % (self.type, e.message)) from None

    def __repr__(self):
        return "Event(id=%r, type=%r, source=%r, time=%r, position=%r, data=%s)" % (
            self.id,
            self.type,
            self.source,
            self.time,
            self.position,
            self.data_json.decode("utf-8", "replace"),
        )


# --- projection ops -------------------------------------------------------


class Upsert:
    """Insert or replace document ``key`` of ``projection`` with ``body`` (a
    JSON value)."""

    __slots__ = ("projection", "key", "body")

    def __init__(self, projection, key, body):
        self.projection = projection
        self.key = key
        self.body = body

    def __eq__(self, other):
        return isinstance(other, Upsert) and (self.projection, self.key, self.body) == (
            other.projection,
            other.key,
            other.body,
        )

    def __repr__(self):
        return "upsert(%r, %r, %r)" % (self.projection, self.key, self.body)


class Delete:
    """Delete document ``key`` of ``projection``."""

    __slots__ = ("projection", "key")

    def __init__(self, projection, key):
        self.projection = projection
        self.key = key

    def __eq__(self, other):
        return isinstance(other, Delete) and (self.projection, self.key) == (
            other.projection,
            other.key,
        )

    def __repr__(self):
        return "delete(%r, %r)" % (self.projection, self.key)


def upsert(projection, key, body):
    """Insert or replace a document (``body`` is any JSON value)."""
    return Upsert(projection, key, body)


def delete(projection, key):
    """Delete a document."""
    return Delete(projection, key)


# --- errors ---------------------------------------------------------------

_SDK_FILE = __file__
_SDK_DIR = os.path.dirname(__file__)


def _is_sdk_frame(frame):
    return os.path.dirname(frame.filename) == _SDK_DIR


def _truncate(text, limit):
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    marker = " ...[truncated]"
    return raw[: limit - len(marker)].decode("utf-8", "ignore") + marker


def keep_sources(module):
    """Keep the source lines of ``module``'s directory tree in ``linecache``
    so that tracebacks show them where the files cannot be read.

    In a componentize-py component the app's files are readable only while
    the component is built (the module's top level runs then, and the heap is
    snapshotted); at run time they are gone. Entries with no mtime are the
    ones ``linecache.checkcache`` leaves alone (as for sources that came from
    a loader), so the lines survive into the snapshot and every call."""
    path = getattr(sys.modules.get(module), "__file__", None)
    if not path:
        return
    root = os.path.dirname(os.path.abspath(path)) + os.sep
    for mod in list(sys.modules.values()):
        filename = getattr(mod, "__file__", None)
        if not filename or not filename.endswith(".py") or filename == _SDK_FILE:
            continue
        if not os.path.abspath(filename).startswith(root) or filename in linecache.cache:
            continue
        try:
            with open(filename, encoding="utf-8") as f:
                lines = f.read().splitlines(True)
        except (OSError, UnicodeDecodeError):
            continue
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


def format_exception(exc, limit=MAX_TRACE_BYTES):
    """The message of a plugin error made from exception ``exc``: its type
    and message, then the innermost frames of plugin code, at most ``limit``
    UTF-8 bytes. A :class:`PluginError` gives its message alone."""
    if isinstance(exc, PluginError):
        return _truncate(exc.message, limit)
    head = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None:
        head += " (from %s)" % "".join(traceback.format_exception_only(type(cause), cause)).strip()
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_sdk_frame(f)]
    kept = frames[-MAX_TRACE_FRAMES:]
    lines = []
    for f in kept:
        lines.append('  File "%s", line %s, in %s' % (f.filename, f.lineno, f.name))
        if f.line:
            lines.append("    " + f.line.strip())
    if kept:
        skipped = len(frames) - len(kept)
        title = "Traceback (most recent call last%s):" % (
            ", %d outer frames omitted" % skipped if skipped else ""
        )
        text = head + "\n" + title + "\n" + "\n".join(lines)
    else:
        text = head
    return _truncate(text, limit)


def _fatal(exc):
    """An exception is a plugin error unless it says nothing about the event:
    running out of memory is the sandbox's limit (the host reports it as a
    memory trap), and exiting is not an answer."""
    return isinstance(exc, (MemoryError, SystemExit, KeyboardInterrupt, GeneratorExit))


# --- batch decoding -------------------------------------------------------


class _Malformed(Exception):
    pass


def _slice(data, span, field_name):
    offset = span.offset
    end = offset + span.len
    if offset < 0 or span.len < 0 or end > len(data):
        raise _Malformed(
            "%s: span %d+%d ends past the batch's %d bytes" % (field_name, offset, span.len, len(data))
        )
    return data[offset:end]


def _text(data, span, field_name):
    raw = _slice(data, span, field_name)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed("%s is not UTF-8: %s" % (field_name, e)) from None


def _event(data, header):
    """The :class:`Event` of one header; every span is checked first."""
    id = _text(data, header.id, "id")
    event_type = _text(data, header.event_type, "type")
    source = _text(data, header.source, "source")
    time = None if header.time is None else _text(data, header.time, "time")
    raw = _slice(data, header.data, "data")
    return Event.from_raw(id, event_type, source, time, header.position, raw)


def _id_or_empty(data, header):
    try:
        return _text(data, header.id, "id")
    except _Malformed:
        return ""


def _events(data, headers):
    """Every event of the batch, or :class:`Failure` for the first header
    that cannot be read."""
    out = []
    for index, header in enumerate(headers):
        try:
            out.append(_event(data, header))
        except _Malformed as e:
            raise Failure(index, _id_or_empty(data, header), "malformed event from the host: %s" % e) from None
    return out


def _first_id(data, headers):
    return _id_or_empty(data, headers[0]) if headers else ""


def _decode_state(plugin, raw, what, first_id):
    """The plugin's state from stored JSON bytes, or a :class:`Failure` at
    event index 0 (no event of the batch could be applied to it)."""
    version = plugin.describe().state_schema_version

    def fail(reason):
        return Failure(
            0,
            first_id,
            "%s does not decode as this plugin's state (schema version %s): %s" % (what, version, reason),
        )

    try:
        value = decode_json(raw)
    except (ValueError, RecursionError) as e:
        raise fail(e) from None
    try:
        return plugin.load_state(value)
    except Exception as e:
        if _fatal(e):
            raise
        raise fail(format_exception(e)) from None


# --- the exports, without the bindings -------------------------------------


def describe(plugin):
    """The plugin's checked :class:`Descriptor`."""
    return plugin.describe().check()


def init(plugin, entity_id):
    """``init`` as JSON bytes."""
    return encode_json(plugin.init(entity_id))


def fold(plugin, state, data, headers):
    """The WIT ``fold`` on plain values: ``state`` is JSON bytes, ``data``
    and ``headers`` the two halves of an ``event-batch`` (headers need the
    attributes ``id``, ``event_type``, ``source``, ``time``, ``data``,
    ``position``; spans ``offset`` and ``len``). Returns the new state's JSON
    bytes or raises :class:`Failure` for the first event that fails.

    Each header is read (and its spans checked) just before its event is
    applied, as in the Rust SDK: a malformed header fails at its index.
    """
    first = _first_id(data, headers)
    current = _decode_state(plugin, state, "state", first)
    events = []
    for index, header in enumerate(headers):
        try:
            event = _event(data, header)
        except _Malformed as e:
            raise Failure(index, _id_or_empty(data, header), "malformed event from the host: %s" % e) from None
        events.append(event)
        try:
            result = plugin.apply(current, event)
        except Exception as e:
            if _fatal(e):
                raise
            raise Failure(index, event.id, format_exception(e)) from None
        if result is not None:
            current = result
    try:
        return encode_json(current)
    except (TypeError, ValueError, RecursionError) as e:
        raise _locate_unencodable(plugin, state, events, e) from None


def _locate_unencodable(plugin, state, events, error):
    """The state after the batch does not encode: fold again, encoding after
    every event, and blame the first event after which it does not (the
    plugin is deterministic, so this finds the same states)."""
    current = _decode_state(plugin, state, "state", events[0].id if events else "")
    for index, seen in enumerate(events):
        # Fresh events: the first run may have mutated decoded data.
        event = Event.from_raw(seen.id, seen.type, seen.source, seen.time, seen.position, seen._raw)
        try:
            result = plugin.apply(current, event)
        except Exception as e:
            if _fatal(e):
                raise
            return Failure(index, event.id, format_exception(e))
        if result is not None:
            current = result
        try:
            encode_json(current)
        except (TypeError, ValueError, RecursionError) as e:
            return Failure(index, event.id, "state after this event does not encode as JSON: %s" % format_exception(e))
    index = max(len(events) - 1, 0)
    return Failure(
        index,
        events[index].id if events else "",
        "state does not encode as JSON: %s" % format_exception(error),
    )


def project(plugin, entity_id, before, after, data, headers):
    """The WIT ``project`` on plain values. Returns a list of
    ``("upsert", projection, key, body_bytes)`` and ``("delete", projection,
    key)`` tuples, or raises :class:`Failure`: for a malformed header at its
    index, for anything else (a state that does not decode, an exception in
    ``project``, an op that is not valid) at index 0, since no event of the
    batch is projected."""
    first = _first_id(data, headers)
    before_state = _decode_state(plugin, before, "state-before", first)
    after_state = _decode_state(plugin, after, "state-after", first)
    events = _events(data, headers)
    try:
        ops = plugin.project(entity_id, before_state, after_state, events)
        return [_encode_op(op) for op in (ops or ())]
    except Exception as e:
        if _fatal(e):
            raise
        raise Failure(0, first, "project: %s" % format_exception(e)) from None


def _encode_op(op):
    if isinstance(op, Upsert):
        _check_names(op.projection, op.key)
        try:
            body = encode_json(op.body)
        except (TypeError, ValueError) as e:
            raise PluginError(
                "document %s/%s does not encode as JSON: %s" % (op.projection, op.key, e)
            ) from None
        return ("upsert", op.projection, op.key, body)
    if isinstance(op, Delete):
        _check_names(op.projection, op.key)
        return ("delete", op.projection, op.key)
    raise PluginError("project returned %r, not an upsert or a delete" % (op,))


def _check_names(projection, key):
    if not isinstance(projection, str) or not isinstance(key, str):
        raise PluginError(
            "projection and key must be strs, not %r and %r" % (projection, key)
        )
