"""Write refold projection plugins in Python.

A plugin owns one entity type: the host hands it batches of one entity's
events, the plugin folds them into a new state (JSON) and derives read-model
operations from the change. Subclass :class:`Plugin`, then in the app module
that componentize-py builds::

    WitWorld = refold_sdk.export(MyPlugin)

See plugins/python/README.md.
"""

from . import log
from .core import (
    Descriptor,
    Event,
    Plugin,
    PluginError,
    Upsert,
    Delete,
    upsert,
    delete,
    field,
    check,
    I64_MIN,
    I64_MAX,
    U64_MAX,
)
from .wit import export

__version__ = "0.1.0"

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
    "check",
    "log",
    "export",
    "I64_MIN",
    "I64_MAX",
    "U64_MAX",
]
