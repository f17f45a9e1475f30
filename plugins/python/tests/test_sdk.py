"""The SDK's core, natively: span decoding, the fold loop, error capture."""

import json
import unittest

import _paths  # noqa: F401
from refold_sdk import Event, Plugin, PluginError, delete, field, upsert
from refold_sdk import core
from refold_sdk.core import Failure
from refold_sdk.testing import Span, batch, run_fold, run_project


class Adder(Plugin):
    """The Rust SDK's test plugin: sums `n` of `add` events, records ids."""

    name = "adder"
    version = "0.1.0"
    entity_type = "counter"
    event_types = ("add",)
    state_schema_version = 3

    def init(self, entity_id):
        return {"sum": 0, "seen": []}

    def load_state(self, value):
        return {"sum": field(value, "sum", int), "seen": field(value, "seen", list)}

    def apply(self, state, event):
        state["seen"].append(event.id)
        if event.type == "add":
            n = event.field("n", int)
            if n < 0:
                raise PluginError("negative: %d" % n)
            if n == 13:
                return _unlucky(state)
            state["sum"] += n

    def project(self, entity_id, before, after, events):
        if after["sum"] == 99:
            {}["boom"]
        return [
            upsert("sums", entity_id, {"from": before["sum"], "to": after["sum"], "n": len(events)}),
            delete("old", entity_id),
        ]


def _unlucky(state):
    return state["sum"] / 0


ADDER = Adder()
S0 = b'{"sum":0,"seen":[]}'


def fold(events, state=S0, plugin=ADDER):
    data, headers = batch(events)
    return core.fold(plugin, state, data, headers)


class Describe(unittest.TestCase):
    def test_from_class_attributes(self):
        d = core.describe(ADDER)
        self.assertEqual(
            (d.name, d.version, d.entity_type, d.event_types, d.state_schema_version),
            ("adder", "0.1.0", "counter", ["add"], 3),
        )

    def test_wrong_types_are_refused(self):
        class Bad(Adder):
            state_schema_version = "3"

        with self.assertRaises(TypeError):
            core.describe(Bad())

    def test_init_is_compact_json(self):
        self.assertEqual(core.init(ADDER, "c1"), S0)


class Fold(unittest.TestCase):
    def test_folds_a_batch_in_order(self):
        out = fold([("a", "add", {"n": 2}), ("b", "other", b""), ("c", "add", {"n": 3})], b'{"sum":1,"seen":[]}')
        self.assertEqual(out, b'{"sum":6,"seen":["a","b","c"]}')

    def test_stops_at_the_first_failing_event(self):
        with self.assertRaises(Failure) as cm:
            fold([("a", "add", {"n": 2}), ("b", "add", {"n": -1}), ("c", "add", "not json")])
        f = cm.exception
        self.assertEqual((f.event_index, f.event_id, f.message), (1, "b", "negative: -1"))

    def test_later_events_are_not_applied(self):
        seen = []

        class Spy(Adder):
            def apply(self, state, event):
                seen.append(event.id)
                return super().apply(state, event)

        with self.assertRaises(Failure):
            fold([("a", "add", {"n": 1}), ("b", "add", {"n": -1}), ("c", "add", {"n": 1})], plugin=Spy())
        self.assertEqual(seen, ["a", "b"])

    def test_schema_mismatch_reads_like_serde(self):
        cases = [
            ({"n": "12.50"}, 'invalid type: string "12.50", expected i64'),
            ({"n": 12.5}, "invalid type: floating point `12.5`, expected i64"),
            ({"n": 1.0}, "invalid type: floating point `1.0`, expected i64"),
            ({"n": True}, "invalid type: boolean `true`, expected i64"),
            ({"n": None}, "invalid type: null, expected i64"),
            ({"n": [1]}, "invalid type: sequence, expected i64"),
            ({"n": 1 << 63}, "invalid value: integer `9223372036854775808`, expected i64"),
            ({}, "missing field `n`"),
            (None, "invalid type: null, expected a map"),
        ]
        for data, reason in cases:
            with self.subTest(data=data), self.assertRaises(Failure) as cm:
                fold([("a", "add", data)])
            self.assertEqual(cm.exception.message, "data of add does not fit its schema: " + reason)

    def test_invalid_json_data_fails_that_event_only_when_read(self):
        for raw in (b"{", b"NaN", b'{"n":Infinity}', b"\xff", b"1 2"):
            with self.subTest(raw=raw), self.assertRaises(Failure) as cm:
                fold([("a", "add", {"n": 1}), ("b", "add", raw)])
            self.assertEqual((cm.exception.event_index, cm.exception.event_id), (1, "b"))
            self.assertTrue(cm.exception.message.startswith("data of add is not valid JSON: "), cm.exception.message)
        # An event type the plugin ignores does not look at its data.
        self.assertEqual(fold([("b", "x", b"{")]), b'{"sum":0,"seen":["b"]}')

    def test_fields_cross_intact(self):
        got = []

        class Seen(Adder):
            def load_state(self, value):
                return value

            def apply(self, state, e):
                got.append((e.id, e.type, e.source, e.time, e.position, e.data_json, e.data))

        fold(
            [("é1", "t", b'{"k":"v"}', "2025-01-01T00:00:00Z"), ("2", "longer type", b""), ("3", "t", b"null")],
            b"[]",
            Seen(),
        )
        self.assertEqual(
            got,
            [
                ("é1", "t", "/test", "2025-01-01T00:00:00Z", 1, b'{"k":"v"}', {"k": "v"}),
                ("2", "longer type", "/test", None, 2, b"null", None),
                ("3", "t", "/test", None, 3, b"null", None),
            ],
        )

    def test_apply_may_return_a_new_state(self):
        class Counter(Adder):
            def init(self, entity_id):
                return 0

            def load_state(self, value):
                return value

            def apply(self, state, event):
                return state + 1

        self.assertEqual(fold([("a", "x", b""), ("b", "y", b"")], b"5", Counter()), b"7")

    def test_output_is_compact_utf8_in_insertion_order(self):
        class Keys(Adder):
            def load_state(self, value):
                return value

            def apply(self, state, event):
                state["z"] = "é"
                state["a"] = [1, {"y": None, "b": True}]

        self.assertEqual(fold([("a", "x", b"")], b"{}", Keys()), '{"z":"é","a":[1,{"y":null,"b":true}]}'.encode())


class Malformed(unittest.TestCase):
    """A batch the SDK cannot read fails its event; nothing raises but Failure."""

    def setUp(self):
        self.data, self.headers = batch([("a", "add", {"n": 1}), ("b", "add", {"n": 2})])

    def test_bad_spans(self):
        far = Span(0xFFFFFFFF, 0xFFFFFFFF)
        past = Span(0, len(self.data) + 1)
        for name, attr in (("id", "id"), ("type", "event_type"), ("source", "source"), ("time", "time"), ("data", "data")):
            for bad in (far, past):
                headers = list(self.headers)
                headers[1] = headers[1].copy(**{attr: bad})
                for run in (
                    lambda: core.fold(ADDER, S0, self.data, headers),
                    lambda: core.project(ADDER, "c1", S0, S0, self.data, headers),
                ):
                    with self.subTest(field=name, span=bad), self.assertRaises(Failure) as cm:
                        run()
                    self.assertEqual(cm.exception.event_index, 1)
                    self.assertTrue(
                        cm.exception.message.startswith("malformed event from the host: %s: span " % name),
                        cm.exception.message,
                    )
                    self.assertEqual(cm.exception.event_id, "" if name == "id" else "b")

    def test_strings_must_be_utf8(self):
        data = bytearray(self.data)
        data[self.headers[0].id.offset] = 0xFF
        with self.assertRaises(Failure) as cm:
            core.fold(ADDER, S0, bytes(data), self.headers)
        self.assertEqual((cm.exception.event_index, cm.exception.event_id), (0, ""))
        self.assertIn("id is not UTF-8", cm.exception.message)

    def test_headers_without_bytes(self):
        with self.assertRaises(Failure):
            core.fold(ADDER, S0, b"", self.headers)

    def test_the_example_of_the_wit(self):
        class H:
            pass

        h = H()
        h.id, h.event_type, h.source, h.time, h.data, h.position = Span(0, 2), Span(2, 1), Span(3, 2), None, Span(5, 7), 7
        got = []

        class Seen(Adder):
            def apply(self, state, e):
                got.append((e.id, e.type, e.source, e.time, e.data, e.position))

        core.fold(Seen(), S0, b'e1t/s{"n":1}', [h])
        self.assertEqual(got, [("e1", "t", "/s", None, {"n": 1}, 7)])


class Exceptions(unittest.TestCase):
    def test_an_exception_becomes_a_plugin_error_with_its_traceback(self):
        with self.assertRaises(Failure) as cm:
            fold([("a", "add", {"n": 1}), ("b", "add", {"n": 13})])
        f = cm.exception
        self.assertEqual((f.event_index, f.event_id), (1, "b"))
        lines = f.message.splitlines()
        self.assertEqual(lines[0], "ZeroDivisionError: division by zero")
        self.assertEqual(lines[1], "Traceback (most recent call last):")
        self.assertIn("in apply", f.message)
        self.assertIn("in _unlucky", lines[-2])
        self.assertEqual(lines[-1].strip(), 'return state["sum"] / 0')
        # The SDK's own frames are left out.
        self.assertNotIn("core.py", f.message)

    def test_the_message_is_bounded(self):
        class Deep(Adder):
            def apply(self, state, event):
                def down(k):
                    if k == 0:
                        raise ValueError("x" * 10000)
                    return down(k - 1)

                down(50)

        with self.assertRaises(Failure) as cm:
            fold([("a", "add", {"n": 1})], plugin=Deep())
        msg = cm.exception.message
        self.assertLessEqual(len(msg.encode()), core.MAX_TRACE_BYTES)
        self.assertTrue(msg.startswith("ValueError: xxx"))
        self.assertTrue(msg.endswith("[truncated]"))
        short = core.format_exception(ValueError("short"))
        self.assertEqual(short, "ValueError: short")

    def test_frames_are_the_innermost_ones(self):
        def down(k):
            if k == 0:
                raise KeyError("k")
            return down(k - 1)

        try:
            down(20)
        except KeyError as e:
            msg = core.format_exception(e)
        self.assertIn("outer frames omitted", msg)
        self.assertEqual(msg.count("in down"), core.MAX_TRACE_FRAMES)

    def test_memory_error_is_not_a_plugin_error(self):
        class Oom(Adder):
            def apply(self, state, event):
                raise MemoryError()

        with self.assertRaises(MemoryError):
            fold([("a", "add", {"n": 1})], plugin=Oom())

    def test_a_state_that_does_not_encode_blames_the_first_event_that_made_it(self):
        class Sets(Adder):
            def load_state(self, value):
                return value

            def apply(self, state, event):
                if event.id == "b":
                    state["bad"] = {1, 2}

        with self.assertRaises(Failure) as cm:
            fold([("a", "x", b""), ("b", "x", b""), ("c", "x", b"")], b"{}", Sets())
        self.assertEqual((cm.exception.event_index, cm.exception.event_id), (1, "b"))
        self.assertIn("does not encode as JSON", cm.exception.message)
        self.assertIn("TypeError", cm.exception.message)

    def test_undecodable_state_fails_at_index_zero(self):
        with self.assertRaises(Failure) as cm:
            fold([("a", "add", {"n": 1})], b'{"total":0}')
        f = cm.exception
        self.assertEqual((f.event_index, f.event_id), (0, "a"))
        self.assertEqual(
            f.message, "state does not decode as this plugin's state (schema version 3): missing field `sum`"
        )
        with self.assertRaises(Failure) as cm:
            fold([], b"not json")
        self.assertEqual(cm.exception.event_id, "")
        # An empty batch still checks (and normalizes) the state.
        self.assertEqual(fold([], b'{ "seen": [], "sum": 4, "x": 1 }'), b'{"sum":4,"seen":[]}')


class Project(unittest.TestCase):
    def test_converts_ops(self):
        ops = run_project(ADDER, {"sum": 1, "seen": []}, {"sum": 5, "seen": []}, [("a", "add", {"n": 4})], "c1")
        self.assertEqual(ops, [("upsert", "sums", "c1", {"from": 1, "to": 5, "n": 1}), ("delete", "old", "c1")])

    def test_body_is_compact_json(self):
        ops = core.project(ADDER, "c1", S0, S0, *batch([]))
        self.assertEqual(ops[0][3], b'{"from":0,"to":0,"n":0}')

    def test_errors(self):
        with self.assertRaises(Failure) as cm:
            run_project(ADDER, None, b"nope", [("a", "add", {"n": 1})])
        self.assertTrue(cm.exception.message.startswith("state-after does not decode"))
        with self.assertRaises(Failure) as cm:
            run_project(ADDER, None, {"sum": 99, "seen": []}, [("a", "add", {"n": 1}), ("b", "add", {"n": 1})])
        f = cm.exception
        self.assertEqual((f.event_index, f.event_id), (0, "a"))
        self.assertTrue(f.message.startswith("project: KeyError: 'boom'\nTraceback"), f.message)

        class BadOps(Adder):
            def project(self, entity_id, before, after, events):
                return [upsert("p", 1, {}), "nope"]

        with self.assertRaises(Failure) as cm:
            run_project(BadOps(), None, None, [])
        self.assertIn("projection and key must be strs", cm.exception.message)


class Events(unittest.TestCase):
    def test_event_for_tests(self):
        e = Event("e1", "t", {"a": 1})
        self.assertEqual((e.data, e.data_json, e.field("a", int)), ({"a": 1}, b'{"a":1}', 1))
        self.assertIsNone(Event("e2", "t").data)
        self.assertEqual(Event("e3", "t", {}).field("a", str, default="x"), "x")

    def test_run_fold_helper(self):
        self.assertEqual(run_fold(ADDER, None, [("a", "add", {"n": 2})]), {"sum": 2, "seen": ["a"]})


if __name__ == "__main__":
    unittest.main()
