"""The bridge between the bindings componentize-py generates for the
``projector`` world and the pure-Python core: WIT values in, WIT values out.

The only module of the SDK that imports the bindings (``wit_world``,
``componentize_py_types``), and only when :func:`export` is called, i.e. when
the app module is imported by componentize-py.
"""

import sys
import traceback

from . import core

__all__ = ["export"]


def _report(export_name, exc):
    """Put an exception that cannot be a plugin error on stderr, which the
    host captures, before componentize-py traps the call.

    It is written the way Rust's panic hook writes a panic (``thread '...'
    panicked at FILE:LINE:`` then the message, ended by a ``note:`` line)
    because that is what the host parses out of a trapped guest's stderr for
    the trap's message; componentize-py's own report, which follows, would
    otherwise name only its runtime's source location."""
    try:
        frames = traceback.extract_tb(exc.__traceback__)
        where = "%s:%s" % (frames[-1].filename, frames[-1].lineno) if frames else "<python>"
        sys.stderr.write(
            "thread 'python' panicked at %s:\n%s: %s\n"
            "note: a Python exception in %s; componentize-py's own report follows\n"
            % (where, export_name, core.format_exception(exc), export_name)
        )
        sys.stderr.flush()
    except BaseException:
        pass


def _need(wit):
    if wit is None:
        raise RuntimeError(
            "refold_sdk: the componentize-py bindings (wit_world) are not importable; "
            "test with refold_sdk.core / refold_sdk.testing instead"
        )


def export(plugin):
    """The class componentize-py calls for the world's exports.

    componentize-py (0.25) looks for a class named ``WitWorld`` in the app
    module and calls the exports as methods of an instance of it, so the app
    module must say::

        WitWorld = refold_sdk.export(MyPlugin)

    ``plugin`` is a :class:`refold_sdk.Plugin` subclass (instantiated once,
    here, which componentize-py does at build time) or an instance.
    """
    if isinstance(plugin, type):
        plugin = plugin()
    core.keep_sources(type(plugin).__module__)

    try:
        from componentize_py_types import Err
        from wit_world.imports import types as wit
    except ImportError:
        # Not in a component (a native test importing the app module): the
        # class is made all the same, its exports fail when called.
        Err = wit = None

    def plugin_error(failure):
        return Err(
            wit.PluginError(
                event_index=min(failure.event_index, 0xFFFFFFFF),
                event_id=failure.event_id,
                message=failure.message,
            )
        )

    class WitWorld:
        def describe(self):
            _need(wit)
            try:
                d = core.describe(plugin)
            except BaseException as e:
                _report("describe", e)
                raise
            return wit.Descriptor(
                name=d.name,
                version=d.version,
                entity_type=d.entity_type,
                event_types=d.event_types,
                state_schema_version=d.state_schema_version,
            )

        def init(self, entity_id):
            _need(wit)
            try:
                return core.init(plugin, entity_id)
            except BaseException as e:
                _report("init", e)
                raise

        def fold(self, entity_id, state, events):
            _need(wit)
            try:
                return core.fold(plugin, state, events.bytes, events.events)
            except core.Failure as f:
                raise plugin_error(f) from None
            except BaseException as e:
                _report("fold", e)
                raise

        def project(self, entity_id, state_before, state_after, events):
            _need(wit)
            try:
                ops = core.project(
                    plugin, entity_id, state_before, state_after, events.bytes, events.events
                )
            except core.Failure as f:
                raise plugin_error(f) from None
            except BaseException as e:
                _report("project", e)
                raise
            out = []
            for op in ops:
                if op[0] == "upsert":
                    out.append(
                        wit.ProjectionOp_Upsert(
                            wit.Document(projection=op[1], key=op[2], body=op[3])
                        )
                    )
                else:
                    out.append(wit.ProjectionOp_Delete((op[1], op[2])))
            return out

    WitWorld.__qualname__ = WitWorld.__name__ = "WitWorld"
    WitWorld.plugin = plugin
    return WitWorld
