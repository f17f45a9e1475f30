// The JS bank plugin, natively: `node --test plugins/js/tests/`.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { encodeBatch, Event, parseJson } from '../refold-sdk/core.js';

let bank, plugin;
before(async () => {
  await import('./wit-stub.js'); // the component's `log` import, stubbed
  ({ bank: plugin, ...bank } = await import('../bank/bank.js'));
});

const enc = (s) => new TextEncoder().encode(s);
const dec = (b) => new TextDecoder().decode(b);
const ev = (type, data, id = 'e') => ({ id, type, data: data === undefined ? '' : JSON.stringify(data) });

function fold(events, state = dec(bank.init('acc-1'))) {
  const r = bank.fold('acc-1', enc(state), encodeBatch(events));
  return r.tag === 'ok' ? { ok: dec(r.val) } : { err: r.val };
}

test('describes itself like the Rust bank 1.0.0', () => {
  assert.deepEqual(bank.describe(), {
    name: 'bank', version: '1.0.0', entityType: 'account',
    eventTypes: ['account.opened', 'account.deposited', 'account.withdrawn', 'account.closed'],
    stateSchemaVersion: 1,
  });
  assert.equal(dec(bank.init('x')), '{"owner":null,"balance":0,"transactions":0,"open":false}');
});

test('folds the happy path', () => {
  const r = fold([
    ev('account.opened', { owner: 'ada' }),
    ev('account.deposited', { amount: 1500 }),
    ev('account.withdrawn', { amount: 200 }),
    ev('account.renamed', { whatever: true }),
    ev('account.closed', null),
    ev('account.closed'),
  ]);
  assert.equal(r.ok, '{"owner":"ada","balance":1300,"transactions":2,"open":false}');
});

test('rejects data that does not fit', () => {
  for (const data of [{ amount: '12.50' }, { amount: 12.5 }, { amount: true }, { amount: null }, {}, null]) {
    const r = fold([ev('account.opened', { owner: 'ada' }, 'e0'), ev('account.deposited', data, 'e1')]);
    assert.deepEqual([r.err.eventIndex, r.err.eventId], [1, 'e1']);
    assert.ok(r.err.message.startsWith('data of account.deposited does not fit its schema: '), r.err.message);
  }
  const r = fold([{ id: 'e', type: 'account.withdrawn', data: '{"amount":12.0}' }]);
  assert.equal(r.err.message, 'data of account.withdrawn does not fit its schema: invalid type: floating point `12.0`, expected i64');
  assert.equal(fold([ev('account.opened', { name: 'ada' })]).err.message,
    'data of account.opened does not fit its schema: missing field `owner`');
  assert.ok(fold([ev('account.opened', { owner: 7 })]).err);
  assert.ok(fold([{ id: 'e', type: 'account.opened', data: '{"owner":' }]).err.message.includes('not valid JSON'));
});

test('i64 arithmetic is exact, overflow is a plugin error', () => {
  const max = '9223372036854775807';
  let r = fold([{ id: 'a', type: 'account.deposited', data: `{"amount":${max}}` }]);
  assert.equal(r.ok, `{"owner":null,"balance":${max},"transactions":1,"open":false}`);
  r = fold([{ id: 'a', type: 'account.deposited', data: `{"amount":${max}}` }, { id: 'b', type: 'account.deposited', data: '{"amount":1}' }]);
  assert.deepEqual(r.err, { eventIndex: 1, eventId: 'b', message: 'deposit of 1 overflows the balance' });
  r = fold([{ id: 'a', type: 'account.withdrawn', data: `{"amount":${max}}` }, { id: 'b', type: 'account.withdrawn', data: '{"amount":1}' }]);
  assert.equal(r.ok, '{"owner":null,"balance":-9223372036854775808,"transactions":2,"open":false}');
  r = fold([{ id: 'c', type: 'account.withdrawn', data: '{"amount":1}' }], r.ok);
  assert.equal(r.err.message, 'withdrawal of 1 overflows the balance');
  // Past 2^53 but inside i64: exact, both ways.
  r = fold([{ id: 'a', type: 'account.deposited', data: '{"amount":9007199254740993}' }]);
  assert.equal(parseJson(r.ok).balance, 9007199254740993n);
  r = fold([{ id: 'b', type: 'account.withdrawn', data: '{"amount":9007199254740992}' }], r.ok);
  assert.equal(r.ok, '{"owner":null,"balance":1,"transactions":2,"open":false}');
  assert.match(fold([{ id: 'a', type: 'account.deposited', data: '{"amount":9223372036854775808}' }]).err.message,
    /invalid value: integer `9223372036854775808`, expected i64/);
});

test('a stored state of the wrong shape does not decode', () => {
  const r = fold([ev('account.closed')], '{"owner":"ada","balance":"1","transactions":0,"open":true}');
  assert.match(r.err.message, /^state does not decode as this plugin's state \(schema version 1\): state does not fit its schema: invalid type: string "1", expected i64/);
  // Keys come back in the documented order, whatever order was stored.
  assert.equal(fold([], '{"open":true,"transactions":0,"balance":5,"owner":"ada"}').ok,
    '{"owner":"ada","balance":5,"transactions":0,"open":true}');
});

test('projects balances by owner', () => {
  const project = (before, after) => {
    const r = bank.project('acc-1', enc(before), enc(after), encodeBatch([]));
    assert.equal(r.tag, 'ok');
    return r.val.map((o) => (o.tag === 'upsert' ? ['upsert', o.val.projection, o.val.key, dec(o.val.body)] : ['delete', ...o.val]));
  };
  const init = dec(bank.init('acc-1'));
  const after = fold([ev('account.opened', { owner: 'ada' }), ev('account.deposited', { amount: 5 })]).ok;
  assert.deepEqual(project(init, after), [['upsert', 'balances', 'ada', '{"owner":"ada","account":"acc-1","balance":5,"open":true}']]);
  const renamed = fold([ev('account.opened', { owner: 'bob' })], after).ok;
  assert.deepEqual(project(after, renamed), [
    ['delete', 'balances', 'ada'],
    ['upsert', 'balances', 'bob', '{"owner":"bob","account":"acc-1","balance":5,"open":true}'],
  ]);
  assert.deepEqual(project(init, init), []);
  assert.deepEqual(project(after, after).length, 1);
});

test('apply can be called directly with Event.of', () => {
  let s = plugin.init('acc-1');
  s = plugin.apply(s, Event.of('e1', 'account.opened', { owner: 'ada' }));
  s = plugin.apply(s, Event.of('e2', 'account.deposited', { amount: 7 }));
  assert.deepEqual(s, { owner: 'ada', balance: 7, transactions: 1, open: true });
});

test('the fixture: examples/bank folds to expected.jsonl (simple replay, no dedup/quarantine)', () => {
  // A plain model of the host for the lines that reach the plugin: one
  // batch per event, duplicates by id dropped, bad lines skipped, an entity
  // stopped at its first plugin error.
  const root = new URL('../../../examples/bank/', import.meta.url);
  const states = new Map();
  const seen = new Set();
  const stopped = new Set();
  for (const line of readFileSync(new URL('events.jsonl', root), 'utf8').split('\n')) {
    let e;
    try { e = JSON.parse(line); } catch { continue; }
    if (!e.id || !e.subject || e.entitytype !== 'account' || seen.has(e.id)) continue;
    seen.add(e.id);
    if (stopped.has(e.subject)) continue;
    const state = states.get(e.subject) ?? dec(bank.init(e.subject));
    const data = e.data === undefined ? '' : JSON.stringify(e.data);
    const r = bank.fold(e.subject, enc(state), encodeBatch([{ id: e.id, type: e.type, data, source: e.source, time: e.time }]));
    if (r.tag === 'err') { stopped.add(e.subject); continue; }
    states.set(e.subject, dec(r.val));
  }
  const expected = readFileSync(new URL('expected.jsonl', root), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  for (const { entity_id, state } of expected) {
    assert.equal(states.get(entity_id), JSON.stringify(state), entity_id);
  }
  assert.equal(states.size, expected.length);
});
