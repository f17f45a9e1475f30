"""The Python bank (plugins/python/bank/app.py), natively: it must behave
like the Rust bank 1.0.0."""

import unittest

import _paths  # noqa: F401
import app
from refold_sdk import I64_MAX, core
from refold_sdk.core import Failure
from refold_sdk.testing import run_fold, run_project

BANK = app.Bank()
INIT = {"owner": None, "balance": 0, "transactions": 0, "open": False}


def fold(events, state=None):
    return run_fold(BANK, state, [("e%d" % i, t, d) for i, (t, d) in enumerate(events)], "acc-1")


class Bank(unittest.TestCase):
    def test_describe(self):
        d = core.describe(BANK)
        self.assertEqual(
            (d.name, d.version, d.entity_type, d.state_schema_version),
            ("bank", "1.0.0", "account", 1),
        )
        self.assertEqual(
            d.event_types, ["account.opened", "account.deposited", "account.withdrawn", "account.closed"]
        )

    def test_initial_state_has_the_documented_shape(self):
        self.assertEqual(core.init(BANK, "x"), b'{"owner":null,"balance":0,"transactions":0,"open":false}')

    def test_the_app_module_exports_the_world_class(self):
        self.assertEqual(app.WitWorld.__name__, "WitWorld")
        self.assertIsInstance(app.WitWorld.plugin, app.Bank)

    def test_folds_the_happy_path(self):
        s = fold(
            [
                ("account.opened", {"owner": "ada"}),
                ("account.deposited", {"amount": 1500}),
                ("account.withdrawn", {"amount": 200}),
                ("account.renamed", {"whatever": True}),
                ("account.closed", None),
            ]
        )
        self.assertEqual(s, {"owner": "ada", "balance": 1300, "transactions": 2, "open": False})
        self.assertEqual(list(s), ["owner", "balance", "transactions", "open"])

    def test_unknown_types_and_extra_fields(self):
        self.assertEqual(fold([("account.statement_requested", b"{")]), INIT)
        s = fold([("account.opened", {"owner": "h", "x": 1}), ("account.deposited", {"amount": 3, "memo": "m"})])
        self.assertEqual(s, {"owner": "h", "balance": 3, "transactions": 1, "open": True})
        # The balance may go negative.
        self.assertEqual(fold([("account.withdrawn", {"amount": 5})])["balance"], -5)

    def test_rejects_data_that_does_not_fit(self):
        prefix = "data of account.deposited does not fit its schema: "
        for data, reason in [
            ({"amount": "12.50"}, 'invalid type: string "12.50", expected i64'),
            ({"amount": 12.5}, "invalid type: floating point `12.5`, expected i64"),
            ({"amount": 12.0}, "invalid type: floating point `12.0`, expected i64"),
            ({"amount": True}, "invalid type: boolean `true`, expected i64"),
            ({"amount": None}, "invalid type: null, expected i64"),
            ({"amount": 1 << 63}, "invalid value: integer `9223372036854775808`, expected i64"),
            ({}, "missing field `amount`"),
        ]:
            with self.subTest(data=data), self.assertRaises(Failure) as cm:
                fold([("account.opened", {"owner": "ada"}), ("account.deposited", data)])
            self.assertEqual((cm.exception.event_index, cm.exception.event_id), (1, "e1"))
            self.assertEqual(cm.exception.message, prefix + reason)
        with self.assertRaises(Failure) as cm:
            fold([("account.deposited", b'{"amount":NaN}')])
        self.assertTrue(cm.exception.message.startswith("data of account.deposited is not valid JSON"))
        for data in ({"name": "ada"}, {"owner": 7}, {"owner": None}, None):
            with self.subTest(data=data), self.assertRaises(Failure) as cm:
                fold([("account.opened", data)])
            self.assertTrue(cm.exception.message.startswith("data of account.opened does not fit its schema: "))

    def test_overflow_is_a_plugin_error(self):
        with self.assertRaises(Failure) as cm:
            fold([("account.deposited", {"amount": I64_MAX}), ("account.deposited", {"amount": 1})])
        self.assertEqual(
            (cm.exception.event_index, cm.exception.message), (1, "deposit of 1 overflows the balance")
        )
        with self.assertRaises(Failure) as cm:
            fold([("account.withdrawn", {"amount": I64_MAX}), ("account.withdrawn", {"amount": 2})])
        self.assertEqual(cm.exception.message, "withdrawal of 2 overflows the balance")
        self.assertEqual(fold([("account.withdrawn", {"amount": I64_MAX}), ("account.withdrawn", {"amount": 1})])["balance"], -(1 << 63))

    def test_stored_state_must_have_the_shape(self):
        with self.assertRaises(Failure) as cm:
            fold([("account.closed", None)], {"owner": "a", "balance": "1", "transactions": 0, "open": True})
        self.assertEqual(
            cm.exception.message,
            "state does not decode as this plugin's state (schema version 1): invalid type: string \"1\", expected i64",
        )
        # owner may be missing (null); unknown keys are dropped; key order is fixed.
        s = fold([], {"open": True, "transactions": 2, "balance": 5, "tier": "gold"})
        self.assertEqual(list(s.items()), [("owner", None), ("balance", 5), ("transactions", 2), ("open", True)])

    def test_projects_balances_by_owner(self):
        before = dict(INIT)
        after = fold([("account.opened", {"owner": "ada"}), ("account.deposited", {"amount": 5})])
        self.assertEqual(
            run_project(BANK, before, after, [], "acc-1"),
            [("upsert", "balances", "ada", {"owner": "ada", "account": "acc-1", "balance": 5, "open": True})],
        )
        renamed = fold([("account.opened", {"owner": "bob"})], after)
        ops = run_project(BANK, after, renamed, [], "acc-1")
        self.assertEqual(ops[0], ("delete", "balances", "ada"))
        self.assertEqual(ops[1][:3], ("upsert", "balances", "bob"))
        self.assertEqual(list(ops[1][3]), ["owner", "account", "balance", "open"])
        self.assertEqual(run_project(BANK, before, before, [], "acc-1"), [])
        # Same owner again: no delete.
        again = fold([("account.opened", {"owner": "ada"})], after)
        self.assertEqual([op[0] for op in run_project(BANK, after, again, [], "acc-1")], ["upsert"])


if __name__ == "__main__":
    unittest.main()
