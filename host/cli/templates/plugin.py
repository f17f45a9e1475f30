"""A refold projection plugin: entity type ``{{entity}}``.

    {{entity}}.added  {"n": int}  total += n, count += 1
    {{entity}}.reset  anything    total = 0,  count += 1
    any other type    anything    nothing

A negative ``n``, or one that is not an integer, is a plugin error: the host
quarantines that entity at its state before the event.
"""

from refold_sdk import Plugin, PluginError, export, upsert


class {{type_name}}(Plugin):
    name = "{{name}}"
    version = "0.1.0"
    entity_type = "{{entity}}"
    event_types = ("{{entity}}.added", "{{entity}}.reset")
    state_schema_version = 1

    def init(self, entity_id):
        return {"total": 0, "count": 0}

    def apply(self, state, event):
        if event.type == "{{entity}}.added":
            n = event.field("n", int)
            if n < 0:
                raise PluginError("cannot add %d: must not be negative" % n)
            state["total"] += n
            state["count"] += 1
        elif event.type == "{{entity}}.reset":
            state["total"] = 0
            state["count"] += 1
        # Unknown event types leave the state unchanged.

    def project(self, entity_id, before, after, events):
        return [upsert("totals", entity_id, {"total": after["total"]})]


# componentize-py looks for the class `WitWorld` in the app module.
WitWorld = export({{type_name}})
