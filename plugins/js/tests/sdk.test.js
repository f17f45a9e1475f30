// Unit tests of the SDK core under plain Node: `node --test plugins/js/tests/`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  createExports, encodeBatch, decodeBatch, Event, PluginError, upsert, del, fields,
  parseJson, stringifyJson, describeException, MAX_MESSAGE,
} from '../refold-sdk/core.js';

const enc = (s) => new TextEncoder().encode(s);
const dec = (b) => new TextDecoder().decode(b);

// The Rust SDK's test plugin: sums `add` events, remembers every id.
const logged = [];
const adder = createExports({
  describe: { name: 'adder', version: '0.1.0', entityType: 'counter', eventTypes: ['add'], stateSchemaVersion: 3 },
  init: () => ({ sum: 0, seen: [] }),
  decodeState: (s) => {
    const f = fields(s, { sum: 'i64', seen: 'any' }, 'state');
    return { sum: f.sum, seen: f.seen };
  },
  apply(state, e) {
    state.seen.push(e.id);
    if (e.type === 'add') {
      const { n } = e.fields({ n: 'i64' });
      if (n < 0) throw new PluginError(`negative: ${n}`);
      if (n === 13) null.boom; // a bug: TypeError
      state.sum += n;
    }
  },
  project: (id, before, after, events) => [
    upsert('sums', id, { from: before.sum, to: after.sum, n: events.length }),
    del('old', id),
  ],
}, { log: (level, msg) => logged.push([level, msg]) });

const ev = (id, type, data, extra = {}) => ({ id, type, data, ...extra });
const fold = (state, events) => adder.fold('c1', enc(state), encodeBatch(events));

test('describe and init cross the boundary', () => {
  assert.deepEqual(adder.describe(), {
    name: 'adder', version: '0.1.0', entityType: 'counter', eventTypes: ['add'], stateSchemaVersion: 3,
  });
  assert.equal(dec(adder.init('c1')), '{"sum":0,"seen":[]}');
});

test('folds a batch in order; mutation in place or a returned state', () => {
  const r = fold('{"sum":1,"seen":[]}', [ev('a', 'add', '{"n":2}'), ev('b', 'other', ''), ev('c', 'add', '{"n":3}')]);
  assert.equal(r.tag, 'ok');
  assert.equal(dec(r.val), '{"sum":6,"seen":["a","b","c"]}');
});

test('stops at the first failing event with its index and id', () => {
  const r = fold('{"sum":0,"seen":[]}', [ev('a', 'add', '{"n":2}'), ev('b', 'add', '{"n":-1}'), ev('c', 'add', 'not json')]);
  assert.deepEqual(r, { tag: 'err', val: { eventIndex: 1, eventId: 'b', message: 'negative: -1' } });
});

test('schema mismatches name the event type, like serde', () => {
  const cases = [
    ['{"n":"12.50"}', 'invalid type: string "12.50", expected i64'],
    ['{"n":12.5}', 'invalid type: floating point `12.5`, expected i64'],
    ['{"n":12.0}', 'invalid type: floating point `12.0`, expected i64'],
    ['{"n":1e3}', 'invalid type: floating point `1e3`, expected i64'],
    ['{"n":true}', 'invalid type: boolean `true`, expected i64'],
    ['{"n":null}', 'invalid type: null, expected i64'],
    ['{"n":[1]}', 'invalid type: sequence, expected i64'],
    ['{}', 'missing field `n`'],
    ['null', 'invalid type: null, expected an object'],
    ['{"n":9223372036854775808}', 'invalid value: integer `9223372036854775808`, expected i64'],
  ];
  for (const [data, why] of cases) {
    const r = fold('{"sum":0,"seen":[]}', [ev('a', 'add', data)]);
    assert.equal(r.tag, 'err', data);
    assert.equal(r.val.message, `data of add does not fit its schema: ${why}`, data);
  }
});

test('invalid JSON data fails that event, only when read', () => {
  const r = fold('{"sum":0,"seen":[]}', [ev('a', 'add', '{"n":1}'), ev('b', 'add', '{')]);
  assert.equal(r.tag, 'err');
  assert.deepEqual([r.val.eventIndex, r.val.eventId], [1, 'b']);
  assert.match(r.val.message, /^data of add is not valid JSON: EOF while parsing/);
  const ok = fold('{"sum":0,"seen":[]}', [ev('b', 'x', '{')]);
  assert.equal(dec(ok.val), '{"sum":0,"seen":["b"]}');
});

test('a thrown exception becomes a plugin error with name, message and stack', () => {
  const r = fold('{"sum":0,"seen":[]}', [ev('a', 'add', '{"n":1}'), ev('b', 'add', '{"n":13}')]);
  assert.equal(r.tag, 'err');
  assert.deepEqual([r.val.eventIndex, r.val.eventId], [1, 'b']);
  assert.match(r.val.message, /^uncaught exception in apply: TypeError: Cannot read properties of null/);
  assert.match(r.val.message, /sdk\.test\.js:\d+/, 'the stack names the plugin source');
  // Values that are not Errors, and huge messages.
  assert.equal(describeException('nope', 'apply'), 'uncaught exception in apply: thrown value "nope"');
  assert.equal(describeException({ code: 1 }, 'apply'), 'uncaught exception in apply: thrown value {"code":1}');
  const long = describeException(new Error('x'.repeat(10000)), 'apply');
  assert.ok(long.length <= MAX_MESSAGE && long.endsWith('(truncated)'));
});

test('exceptions in init reach stderr and the log, then rethrow', () => {
  const boom = createExports({
    describe: adder.describe(), init: () => { throw new RangeError('no init'); }, apply: () => {},
  }, { log: (l, m) => logged.push([l, m]) });
  const errors = [];
  const orig = console.error;
  console.error = (m) => errors.push(m);
  try {
    assert.throws(() => boom.init('x'), RangeError);
  } finally {
    console.error = orig;
  }
  assert.match(errors[0], /^refold plugin adder 0\.1\.0: uncaught exception in init: RangeError: no init/);
  assert.equal(logged.at(-1)[0], 'error');
});

test('an async apply is refused, as a plugin error', () => {
  const p = createExports({ describe: adder.describe(), init: () => 0, apply: async () => 1 });
  const r = p.fold('c', enc('0'), encodeBatch([ev('a', 't', '')]));
  assert.match(r.val.message, /apply must be synchronous/);
});

test('event fields cross intact', () => {
  const seen = createExports({
    describe: adder.describe(), init: () => [],
    apply: (s, e) => [...s, [e.id, e.type, e.source, e.time, e.position, e.dataJson, e.data]],
  });
  const batch = encodeBatch([
    ev('é1', 't', '{"k":"v"}', { time: '2025-01-01T00:00:00Z' }),
    ev('2', 'longer type', ''),
    ev('3', 't', 'null', { position: 2n ** 60n }),
  ]);
  const r = seen.fold('c', enc('[]'), batch);
  assert.deepEqual(parseJson(dec(r.val)), [
    ['é1', 't', '/test', '2025-01-01T00:00:00Z', 1, '{"k":"v"}', { k: 'v' }],
    ['2', 'longer type', '/test', null, 2, 'null', null],
    ['3', 't', '/test', null, 2n ** 60n, 'null', null],
  ]);
});

test('malformed batches from the host are plugin errors, not crashes', () => {
  const state = '{"sum":0,"seen":[]}';
  const good = encodeBatch([ev('a', 'add', '{"n":1}'), ev('b', 'add', '{"n":2}')]);
  const far = { offset: 0xffffffff, len: 0xffffffff };
  const past = { offset: 0, len: good.bytes.length + 1 };
  for (const field of ['id', 'eventType', 'source', 'time', 'data']) {
    for (const bad of [far, past]) {
      const events = good.events.map((h) => ({ ...h }));
      events[1][field] = bad;
      const name = field === 'eventType' ? 'type' : field;
      for (const r of [
        adder.fold('c1', enc(state), { bytes: good.bytes, events }),
        adder.project('c1', enc(state), enc(state), { bytes: good.bytes, events }),
        decodeBatch({ bytes: good.bytes, events }),
      ]) {
        assert.equal(r.tag, 'err');
        assert.equal(r.val.eventIndex, 1, field);
        assert.ok(r.val.message.startsWith(`malformed event from the host: ${name}: span `), r.val.message);
        assert.equal(r.val.eventId, field === 'id' ? '' : 'b');
      }
    }
  }
  // Strings must be UTF-8.
  const bytes = good.bytes.slice();
  bytes[good.events[0].id.offset] = 0xff;
  const r = adder.fold('c1', enc(state), { bytes, events: good.events });
  assert.deepEqual([r.tag, r.val.eventIndex, r.val.eventId], ['err', 0, '']);
  assert.match(r.val.message, /^malformed event from the host: id is not UTF-8/);
  // Data that is not UTF-8 fails when read, as JSON that does not decode.
  const d = good.events[1].data;
  const bytes2 = good.bytes.slice();
  bytes2[d.offset + 2] = 0xc3;
  const r2 = adder.fold('c1', enc(state), { bytes: bytes2, events: good.events });
  assert.deepEqual([r2.val.eventIndex, r2.val.eventId], [1, 'b']);
  assert.match(r2.val.message, /^data of add is not valid JSON: invalid UTF-8/);
  // Headers but no bytes at all.
  assert.equal(adder.fold('c1', enc(state), { bytes: new Uint8Array(), events: good.events }).tag, 'err');
});

test('a state that does not decode fails at index zero', () => {
  let r = fold('{"total":0}', [ev('a', 'add', '{"n":1}')]);
  assert.deepEqual([r.val.eventIndex, r.val.eventId], [0, 'a']);
  assert.equal(r.val.message,
    "state does not decode as this plugin's state (schema version 3): state does not fit its schema: missing field `sum`");
  r = fold('{"sum":', []);
  assert.match(r.val.message, /^state does not decode .*: EOF while parsing a value/);
  // An empty batch still checks (and normalizes) the state.
  assert.equal(dec(fold('{ "seen": [], "sum": 4 }', []).val), '{"sum":4,"seen":[]}');
});

test('project converts ops; failures are plugin errors at index 0', () => {
  const r = adder.project('c1', enc('{"sum":1,"seen":[]}'), enc('{"sum":5,"seen":[]}'),
    encodeBatch([ev('a', 'add', '{"n":4}')]));
  assert.equal(r.tag, 'ok');
  assert.equal(r.val.length, 2);
  assert.deepEqual([r.val[0].tag, r.val[0].val.projection, r.val[0].val.key], ['upsert', 'sums', 'c1']);
  assert.equal(dec(r.val[0].val.body), '{"from":1,"to":5,"n":1}');
  assert.deepEqual(r.val[1], { tag: 'delete', val: ['old', 'c1'] });
  const bad = adder.project('c1', enc('{"sum":1,"seen":[]}'), enc('nope'), encodeBatch([]));
  assert.match(bad.val.message, /^state-after does not decode/);
  const thrower = createExports({
    describe: adder.describe(), init: () => 0, apply: () => {}, project: () => [{ op: 'bogus' }],
  });
  const t = thrower.project('c', enc('0'), enc('0'), encodeBatch([ev('a', 't', '')]));
  assert.deepEqual([t.tag, t.val.eventIndex, t.val.eventId], ['err', 0, 'a']);
  assert.match(t.val.message, /^uncaught exception in project: TypeError: project returned ops\[0\]/);
});

test('JSON: exact integers, insertion order, compact', () => {
  const text = '{"b":1,"a":[9007199254740993,-9223372036854775808,2.5,"\\u00e9\\n"],"c":{"__proto__":null}}';
  const v = parseJson(text);
  assert.equal(v.a[0], 9007199254740993n);
  assert.equal(stringifyJson(v), '{"b":1,"a":[9007199254740993,-9223372036854775808,2.5,"é\\n"],"c":{"__proto__":null}}');
  assert.equal(Object.getPrototypeOf(v.c), Object.prototype);
  for (const bad of ['', '{', '[1,]', '01', '"\u0001"', '{"a":1}x', 'nul']) {
    assert.throws(() => parseJson(bad), SyntaxError, bad);
  }
  assert.equal(stringifyJson({ a: undefined, b: [undefined], c: NaN }), '{"b":[null],"c":null}');
  assert.equal(Event.of('e', 't', { x: 1 }).dataJson, '{"x":1}');
});
