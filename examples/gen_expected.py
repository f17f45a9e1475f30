#!/usr/bin/env python3
"""Computes the expected entity states of the example event logs.

    python3 examples/gen_expected.py           # rewrite the expected*.jsonl files
    python3 examples/gen_expected.py --check   # exit 1 if any differs

It is an independent model, in plain Python, of what the host does with a log
and what the example plugins (plugins/bank, plugins/orders) do with an event,
so the expected files are not produced by the code they test. It also prints
which lines are dead letters, duplicates, poison or held.

Host rules modelled here:
  1. A line that is not a JSON object, lacks a string "id", "type", "subject"
     or "entitytype", or names an entity type no plugin owns, is a dead letter.
  2. A line whose "id" was already seen is a duplicate and is dropped.
  3. An entity is (entitytype, subject); its events are folded in log order,
     starting from the plugin's initial state.
  4. When the plugin fails on an event (data that does not fit, a broken
     invariant), the entity is quarantined at its state before that event,
     and that event and all later events of the entity are held.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


class PluginError(Exception):
    pass


def is_int(v):
    # serde reads a JSON integer into an i64; 12.5, 12.0 and "12" are errors.
    return type(v) is int


def field(data, name, check, what):
    if not isinstance(data, dict) or name not in data or not check(data[name]):
        raise PluginError(f"data does not fit: {name} must be {what}")
    return data[name]


# ---- plugins/bank -----------------------------------------------------------

def bank_init(v2):
    state = {"owner": None, "balance": 0, "transactions": 0, "open": False}
    if v2:
        state["tier"] = "standard"
    return state


def bank_apply(state, typ, data, v2):
    s = dict(state)
    if typ == "account.opened":
        s["owner"] = field(data, "owner", lambda v: isinstance(v, str), "a string")
        s["open"] = True
    elif typ == "account.deposited":
        s["balance"] += field(data, "amount", is_int, "an integer")
        s["transactions"] += 1
    elif typ == "account.withdrawn":
        s["balance"] -= field(data, "amount", is_int, "an integer")
        s["transactions"] += 1
    elif typ == "account.closed":
        s["open"] = False
    if v2:
        s["tier"] = "gold" if s["balance"] >= 100000 else "standard"
    return s


# ---- plugins/orders ---------------------------------------------------------

ORDER_TYPES = {"order.created", "order.item_added", "order.item_removed",
               "order.paid", "order.shipped", "order.cancelled"}


def orders_init():
    return {"customer": None, "status": "new", "items": {}, "total": 0, "paid": 0,
            "cancel_reason": None}


def orders_apply(state, typ, data):
    if typ not in ORDER_TYPES:
        return state
    s = dict(state, items=dict(state["items"]))
    status = s["status"]
    if typ != "order.created" and status == "new":
        raise PluginError(f"{typ} before order.created")
    if typ == "order.created":
        if status != "new":
            raise PluginError("order.created twice")
        s["customer"] = field(data, "customer", lambda v: isinstance(v, str), "a string")
        s["status"] = "created"
    elif typ == "order.item_added":
        if status != "created":
            raise PluginError("items can only change while created")
        sku = field(data, "sku", lambda v: isinstance(v, str), "a string")
        qty = field(data, "qty", is_int, "an integer")
        price = field(data, "price", is_int, "an integer")
        if qty < 1 or price < 0:
            raise PluginError("qty must be >= 1 and price >= 0")
        s["items"][sku] = {"qty": qty, "price": price}
    elif typ == "order.item_removed":
        if status != "created":
            raise PluginError("items can only change while created")
        sku = field(data, "sku", lambda v: isinstance(v, str), "a string")
        if sku not in s["items"]:
            raise PluginError(f"no such item {sku}")
        del s["items"][sku]
    elif typ == "order.paid":
        if status != "created":
            raise PluginError("only a created order can be paid")
        amount = field(data, "amount", is_int, "an integer")
        if s["total"] <= 0 or amount != s["total"]:
            raise PluginError(f"amount {amount} does not equal a positive total {s['total']}")
        s["paid"] = amount
        s["status"] = "paid"
    elif typ == "order.shipped":
        if status != "paid":
            raise PluginError("only a paid order can ship")
        s["status"] = "shipped"
    elif typ == "order.cancelled":
        if status not in ("created", "paid"):
            raise PluginError(f"a {status} order cannot be cancelled")
        reason = None
        if data is not None:
            if not isinstance(data, dict):
                raise PluginError("data does not fit")
            reason = data.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise PluginError("reason must be a string")
        s["status"] = "cancelled"
        s["cancel_reason"] = reason
    s["items"] = dict(sorted(s["items"].items()))  # BTreeMap order
    s["total"] = sum(i["qty"] * i["price"] for i in s["items"].values())
    return s


# ---- the host ---------------------------------------------------------------

def run(log_path, entity_type, init, apply):
    """Returns ({entity_id: state}, report lines)."""
    seen_ids = set()
    history = {}  # entity id -> [(line number, id, type, data)]
    report = []
    for number, line in enumerate(log_path.read_text().splitlines(), start=1):
        try:
            event = json.loads(line)
        except ValueError as e:
            report.append(f"line {number}: dead letter: invalid JSON ({e})")
            continue
        missing = [k for k in ("id", "type", "subject", "entitytype")
                   if not isinstance(event, dict) or not isinstance(event.get(k), str)]
        if missing:
            report.append(f"line {number}: dead letter: no {', '.join(missing)}")
            continue
        if event["entitytype"] != entity_type:
            report.append(f"line {number}: dead letter: unknown entity type {event['entitytype']}")
            continue
        if event["id"] in seen_ids:
            report.append(f"line {number}: duplicate of {event['id']}")
            continue
        seen_ids.add(event["id"])
        history.setdefault(event["subject"], []).append(
            (number, event["id"], event["type"], event.get("data")))

    states = {}
    for entity_id, events in history.items():
        state = init()
        for i, (number, event_id, typ, data) in enumerate(events):
            try:
                state = apply(state, typ, data)
            except PluginError as e:
                report.append(f"line {number}: poison {event_id}: {entity_id} quarantined ({e})")
                for held_number, held_id, _, _ in events[i + 1:]:
                    report.append(f"line {held_number}: held {held_id} ({entity_id} is quarantined)")
                break
        states[entity_id] = state
    return states, sorted(report, key=lambda r: int(r.split(":")[0].split()[1]))


def render(entity_type, states):
    return "".join(
        json.dumps({"entity_type": entity_type, "entity_id": eid, "state": states[eid]},
                   separators=(",", ":")) + "\n"
        for eid in sorted(states))


def main():
    check = "--check" in sys.argv[1:]
    outputs = {}
    bank_log = HERE / "bank" / "events.jsonl"
    for v2, name in ((False, "expected.jsonl"), (True, "expected-v2.jsonl")):
        states, report = run(bank_log, "account", lambda: bank_init(v2),
                             lambda s, t, d: bank_apply(s, t, d, v2))
        outputs[HERE / "bank" / name] = render("account", states)
    print("examples/bank/events.jsonl:", *report, sep="\n  ")
    states, report = run(HERE / "orders" / "events.jsonl", "order", orders_init, orders_apply)
    outputs[HERE / "orders" / "expected.jsonl"] = render("order", states)
    print("examples/orders/events.jsonl:", *report, sep="\n  ")

    stale = [p for p, text in outputs.items() if not p.exists() or p.read_text() != text]
    if check:
        for p in stale:
            print(f"differs: {p.relative_to(HERE.parent)}", file=sys.stderr)
        sys.exit(1 if stale else 0)
    for p in stale:
        p.write_text(outputs[p])
        print(f"wrote {p.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
