"""Example plugin: bank accounts, in Python. Entity type ``account``, amounts
in integer cents. Behaves exactly like the Rust bank 1.0.0 (plugins/bank,
without its ``v2`` feature), so examples/bank is its fixture too.

=====================  ===================  ======================================
event type             data                 effect
=====================  ===================  ======================================
``account.opened``     ``{"owner": str}``   ``owner`` set, ``open = true``
``account.deposited``  ``{"amount": int}``  ``balance += amount``, ``transactions += 1``
``account.withdrawn``  ``{"amount": int}``  ``balance -= amount``, ``transactions += 1``
``account.closed``     anything             ``open = false``
any other type         anything             nothing
=====================  ===================  ======================================

Data that does not fit its event's schema is a plugin error: a missing or
non-string ``owner``; an ``amount`` that is missing, a string, a float (even
``12.0``), a bool, null or outside i64. So is a balance that would overflow an
i64. Extra fields are ignored. The error messages are the Rust bank's, e.g.
``data of account.deposited does not fit its schema: invalid type: string
"12.50", expected i64``.

State (schema version 1), initially
``{"owner":null,"balance":0,"transactions":0,"open":false}``, always in that
key order. A stored state must have that shape (``owner`` may be missing,
meaning null; other keys are dropped), else the batch fails at its first
event.

Projection ``balances``, one document per owner, key = owner:
``{"owner","account","balance","open"}``, upserted after every batch of an
account that has an owner. When an account's owner changes (a second
``account.opened``), the old owner's document is deleted first. Two accounts
with the same owner share one document: the last batch wins.
"""

from refold_sdk import I64_MAX, I64_MIN, U64_MAX, Plugin, PluginError, delete, export, field, upsert


class Bank(Plugin):
    name = "bank"
    version = "1.0.0"
    entity_type = "account"
    event_types = ("account.opened", "account.deposited", "account.withdrawn", "account.closed")
    state_schema_version = 1

    def init(self, entity_id):
        return {"owner": None, "balance": 0, "transactions": 0, "open": False}

    def load_state(self, value):
        owner = field(value, "owner", str, default=None)
        transactions = field(value, "transactions", int)
        if transactions < 0:
            raise PluginError("invalid value: integer `%d`, expected u64" % transactions)
        return {
            "owner": owner,
            "balance": field(value, "balance", int),
            "transactions": transactions,
            "open": field(value, "open", bool),
        }

    def apply(self, state, event):
        kind = event.type
        if kind == "account.opened":
            state["owner"] = event.field("owner", str)
            state["open"] = True
        elif kind == "account.deposited":
            amount = event.field("amount", int)
            balance = state["balance"] + amount
            if not I64_MIN <= balance <= I64_MAX:
                raise PluginError("deposit of %d overflows the balance" % amount)
            state["balance"] = balance
            state["transactions"] = _count(state["transactions"])
        elif kind == "account.withdrawn":
            amount = event.field("amount", int)
            balance = state["balance"] - amount
            if not I64_MIN <= balance <= I64_MAX:
                raise PluginError("withdrawal of %d overflows the balance" % amount)
            state["balance"] = balance
            state["transactions"] = _count(state["transactions"])
        elif kind == "account.closed":
            state["open"] = False
        # Any other type: unchanged.

    def project(self, entity_id, before, after, events):
        ops = []
        old, owner = before["owner"], after["owner"]
        if old is not None and owner != old:
            ops.append(delete("balances", old))
        if owner is not None:
            ops.append(
                upsert(
                    "balances",
                    owner,
                    {"owner": owner, "account": entity_id, "balance": after["balance"], "open": after["open"]},
                )
            )
        return ops


def _count(transactions):
    if transactions >= U64_MAX:
        raise PluginError("transaction count overflows u64")
    return transactions + 1


WitWorld = export(Bank)
