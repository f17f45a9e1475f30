// The refold SDK's core: everything but the component's `log` import, so that
// it runs under plain Node (unit tests) as well as inside the component.
//
// `createExports(plugin, { log })` turns a plugin definition into the four
// functions of the `projector` world (describe, init, fold, project), in the
// shape componentize-js's generated bindings call and expect:
//   - list<u8> arrives and leaves as a Uint8Array;
//   - u64 arrives as a BigInt;
//   - result<T, plugin-error>: we always *return* `{ tag: 'ok', val }` or
//     `{ tag: 'err', val: { eventIndex, eventId, message } }`. (A value thrown
//     out of an export becomes the err payload only if it is not an Error; an
//     Error instance is rethrown by the bindings and the call traps, so the
//     SDK never lets one escape from fold or project.)
//   - variant projection-op: `{ tag: 'upsert', val: { projection, key, body } }`
//     or `{ tag: 'delete', val: [projection, key] }`.

import { parse, stringify, literal } from './json.js';

export { parse as parseJson, stringify as stringifyJson } from './json.js';

/** Longest message (in UTF-16 units) the SDK puts into a plugin-error. */
export const MAX_MESSAGE = 4096;

/**
 * Why an event cannot be applied. Throw it from `apply`: the SDK adds the
 * index and id of the event before handing it to the host, so the message
 * only needs to say what is wrong. Any other exception is reported too, with
 * its name, message and stack.
 */
export class PluginError extends Error {
  constructor(message) {
    super(message);
    this.name = 'PluginError';
  }
}

// ---------------------------------------------------------------- text

const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const ENCODER = new TextEncoder();

function utf8(bytes, what) {
  try {
    return UTF8.decode(bytes);
  } catch (e) {
    throw new Malformed(`${what} is not UTF-8: ${e && e.message ? e.message : e}`);
  }
}

function bound(message) {
  if (message.length <= MAX_MESSAGE) return message;
  const cut = '… (truncated)';
  return message.slice(0, MAX_MESSAGE - cut.length) + cut;
}

/** A message for any thrown value: PluginError's message as is, otherwise
 * the exception's name, message and (bounded) stack. */
export function describeException(e, where) {
  if (e instanceof PluginError) return bound(String(e.message));
  let head;
  let stack = '';
  if (e instanceof Error || (e !== null && typeof e === 'object' && 'message' in e)) {
    const name = e.name || 'Error';
    head = `${name}: ${e.message}`;
    if (typeof e.stack === 'string' && e.stack !== '') {
      // V8 starts its stack with "Name: message"; SpiderMonkey does not.
      stack = e.stack.startsWith(head) ? e.stack.slice(head.length) : e.stack;
      stack = stack.replace(/^\n+/, '').replace(/\s+$/, '');
    }
  } else {
    let shown;
    try { shown = typeof e === 'string' ? JSON.stringify(e) : stringify(e); } catch { shown = undefined; }
    head = `thrown value ${shown ?? String(e)}`;
  }
  const msg = `uncaught exception in ${where}: ${head}` + (stack ? `\n${stack}` : '');
  return bound(msg);
}

// ---------------------------------------------------------------- batch

class Malformed extends Error {}

function slice(bytes, span, what) {
  const { offset, len } = span;
  const end = offset + len; // both u32: exact in a double
  if (!Number.isInteger(offset) || !Number.isInteger(len) || offset < 0 || len < 0 || end > bytes.length) {
    throw new Malformed(`${what}: span ${offset}+${len} ends past the batch's ${bytes.length} bytes`);
  }
  return bytes.subarray(offset, end);
}

function text(bytes, span, what) {
  return utf8(slice(bytes, span, what), what);
}

const NULL_BYTES = ENCODER.encode('null');
const UNREAD = Symbol('unread');

/**
 * One event of an entity, as the host stored it (a CloudEvent).
 * `data` is decoded from JSON when first read (null for null or no data);
 * reading it throws a PluginError when it is not valid JSON.
 */
export class Event {
  constructor(id, type, source, time, position, dataBytes) {
    /** CloudEvents `id`: unique per event. */
    this.id = id;
    /** CloudEvents `type`, e.g. "account.deposited". */
    this.type = type;
    /** CloudEvents `source`. */
    this.source = source;
    /** CloudEvents `time` (RFC 3339) or null. */
    this.time = time;
    /** Position in the entity's history (1, 2, ...): a Number, or a BigInt past 2^53. */
    this.position = position;
    /** The data's JSON bytes (empty means null). */
    this.dataBytes = dataBytes;
    this._data = UNREAD;
  }

  /** An event for tests: `Event.of('e1', 'account.deposited', { amount: 5 })`. */
  static of(id, type, data = null, { source = '', time = null, position = 0 } = {}) {
    const json = data === undefined ? '' : stringify(data);
    return new Event(id, type, source, time, position, ENCODER.encode(json ?? ''));
  }

  /** The data's JSON text (`null` when absent). */
  get dataJson() {
    const b = this.dataBytes.length === 0 ? NULL_BYTES : this.dataBytes;
    try {
      return UTF8.decode(b);
    } catch (e) {
      throw new PluginError(`data of ${this.type} is not valid JSON: invalid UTF-8 (${e.message})`);
    }
  }

  /** The data, decoded from JSON once (integers beyond 2^53 as BigInt). */
  get data() {
    if (this._data === UNREAD) {
      const json = this.dataJson;
      try {
        this._data = parse(json);
      } catch (e) {
        throw new PluginError(`data of ${this.type} is not valid JSON: ${e.message}`);
      }
    }
    return this._data;
  }

  /**
   * The data as an object with these fields, checked like a Rust struct
   * with serde: `event.fields({ amount: 'i64' })`. Kinds: 'string', 'i64',
   * 'u64', 'number', 'bool', 'any', each optionally followed by '?' (may be
   * missing or null; then undefined or null). Unknown extra fields are
   * ignored. Throws PluginError "data of TYPE does not fit its schema: ...".
   */
  fields(spec) {
    return fields(this.data, spec, `data of ${this.type}`);
  }
}

function kindName(v, raw) {
  if (v === null) return 'null';
  switch (typeof v) {
    case 'string': return `string ${JSON.stringify(v)}`;
    case 'boolean': return `boolean \`${v}\``;
    case 'bigint': return `integer \`${v}\``;
    case 'number':
      return raw !== undefined && /[.eE]/.test(raw) || !Number.isInteger(v)
        ? `floating point \`${raw ?? v}\`` : `integer \`${v}\``;
  }
  return Array.isArray(v) ? 'sequence' : 'map';
}

const I64_MIN = -(2n ** 63n), I64_MAX = 2n ** 63n - 1n, U64_MAX = 2n ** 64n - 1n;

/** An integer in [min, max] from a JSON value; Number when safe, else BigInt. */
function integer(v, raw, min, max, name) {
  const isFloatLiteral = raw !== undefined && /[.eE]/.test(raw);
  if (!isFloatLiteral && (typeof v === 'bigint' || (typeof v === 'number' && Number.isInteger(v)))) {
    const b = BigInt(v);
    if (b < min || b > max) throw `invalid value: integer \`${b}\`, expected ${name}`;
    return typeof v === 'bigint' && Number.isSafeInteger(Number(v)) ? Number(v) : v;
  }
  throw `invalid type: ${kindName(v, raw)}, expected ${name}`;
}

const CHECKS = {
  string: (v, raw) => { if (typeof v === 'string') return v; throw `invalid type: ${kindName(v, raw)}, expected a string`; },
  bool: (v, raw) => { if (typeof v === 'boolean') return v; throw `invalid type: ${kindName(v, raw)}, expected a boolean`; },
  number: (v, raw) => { if (typeof v === 'number' || typeof v === 'bigint') return v; throw `invalid type: ${kindName(v, raw)}, expected f64`; },
  i64: (v, raw) => integer(v, raw, I64_MIN, I64_MAX, 'i64'),
  u64: (v, raw) => integer(v, raw, 0n, U64_MAX, 'u64'),
  any: (v) => v,
};

/**
 * Check `value` (decoded JSON) against a field spec (see Event#fields) and
 * return a new object holding just those fields, in spec order. Throws a
 * PluginError `${what} does not fit its schema: ...`.
 */
export function fields(value, spec, what = 'value') {
  const fail = (why) => { throw new PluginError(`${what} does not fit its schema: ${why}`); };
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    fail(`invalid type: ${kindName(value)}, expected an object`);
  }
  const out = {};
  for (const [name, kind] of Object.entries(spec)) {
    const optional = kind.endsWith('?');
    const base = optional ? kind.slice(0, -1) : kind;
    const check = CHECKS[base];
    if (check === undefined) throw new TypeError(`unknown field kind ${JSON.stringify(kind)} for ${name}`);
    const present = Object.prototype.hasOwnProperty.call(value, name);
    const v = present ? value[name] : undefined;
    if (!present || (optional && v === null)) {
      if (!optional && base !== 'any') fail(`missing field \`${name}\``);
      out[name] = present ? v : (base === 'any' ? null : undefined);
      continue;
    }
    try {
      out[name] = check(v, literal(value, name));
    } catch (why) {
      if (typeof why === 'string') fail(why);
      throw why;
    }
  }
  return out;
}

/** Read event `index` of a batch; throws Malformed. */
function readEvent(bytes, h) {
  const id = text(bytes, h.id, 'id');
  const type = text(bytes, h.eventType, 'type');
  const source = text(bytes, h.source, 'source');
  const time = h.time == null ? null : text(bytes, h.time, 'time');
  const data = slice(bytes, h.data, 'data');
  let position = h.position;
  if (typeof position === 'bigint' && position <= BigInt(Number.MAX_SAFE_INTEGER)) position = Number(position);
  return new Event(id, type, source, time, position, data);
}

function idOf(bytes, h) {
  try { return text(bytes, h.id, 'id'); } catch { return ''; }
}

const err = (eventIndex, eventId, message) => ({ tag: 'err', val: { eventIndex, eventId, message } });

/** The events of a batch (`{ bytes, events }`), or the plugin-error for the first bad one. */
export function decodeBatch(batch) {
  const bytes = batch.bytes instanceof Uint8Array ? batch.bytes : Uint8Array.from(batch.bytes);
  const out = [];
  for (let index = 0; index < batch.events.length; index++) {
    const h = batch.events[index];
    try {
      out.push(readEvent(bytes, h));
    } catch (e) {
      if (!(e instanceof Malformed)) throw e;
      return err(index, idOf(bytes, h), `malformed event from the host: ${e.message}`);
    }
  }
  return { tag: 'ok', val: out };
}

// ---------------------------------------------------------------- ops

/** Insert or replace document `key` of `projection` with `body` (any JSON value). */
export function upsert(projection, key, body) {
  return { op: 'upsert', projection, key, body };
}

/** Delete document `key` of `projection` (a no-op if absent). */
export function del(projection, key) {
  return { op: 'delete', projection, key };
}

function encodeOp(o, i) {
  if (o === null || typeof o !== 'object' || (o.op !== 'upsert' && o.op !== 'delete')) {
    throw new TypeError(`project returned ops[${i}] that is not an op made by upsert() or del()`);
  }
  if (typeof o.projection !== 'string' || typeof o.key !== 'string') {
    throw new TypeError(`ops[${i}]: projection and key must be strings`);
  }
  if (o.op === 'delete') return { tag: 'delete', val: [o.projection, o.key] };
  const json = stringify(o.body);
  if (json === undefined) throw new TypeError(`ops[${i}]: document for projection ${o.projection} does not encode as JSON`);
  return { tag: 'upsert', val: { projection: o.projection, key: o.key, body: ENCODER.encode(json) } };
}

// ---------------------------------------------------------------- log

export const LEVELS = ['trace', 'debug', 'info', 'warn', 'error'];

/** Log helpers writing through `sink(level, message)`. */
export function makeLog(sink) {
  const log = {};
  for (const level of LEVELS) log[level] = (message) => sink(level, String(message));
  return log;
}

// ---------------------------------------------------------------- plugin

const DESCRIBE_KEYS = ['name', 'version', 'entityType', 'eventTypes', 'stateSchemaVersion'];

function checkPlugin(p) {
  if (p === null || typeof p !== 'object') throw new TypeError('definePlugin: expected an object');
  const d = p.describe;
  if (d === null || typeof d !== 'object') throw new TypeError('definePlugin: `describe` must be an object');
  for (const k of DESCRIBE_KEYS) if (!(k in d)) throw new TypeError(`definePlugin: describe.${k} is missing`);
  if (!Array.isArray(d.eventTypes) || d.eventTypes.some((t) => typeof t !== 'string')) {
    throw new TypeError('definePlugin: describe.eventTypes must be an array of strings');
  }
  if (!Number.isInteger(d.stateSchemaVersion) || d.stateSchemaVersion < 0 || d.stateSchemaVersion > 0xffffffff) {
    throw new TypeError('definePlugin: describe.stateSchemaVersion must be a u32');
  }
  for (const k of ['name', 'version', 'entityType']) {
    if (typeof d[k] !== 'string') throw new TypeError(`definePlugin: describe.${k} must be a string`);
  }
  if (typeof p.init !== 'function') throw new TypeError('definePlugin: `init(entityId)` must be a function');
  if (typeof p.apply !== 'function') throw new TypeError('definePlugin: `apply(state, event)` must be a function');
  if (p.project !== undefined && typeof p.project !== 'function') throw new TypeError('definePlugin: `project` must be a function');
  if (p.decodeState !== undefined && typeof p.decodeState !== 'function') throw new TypeError('definePlugin: `decodeState` must be a function');
}

function isThenable(v) {
  return v !== null && (typeof v === 'object' || typeof v === 'function') && typeof v.then === 'function';
}

/**
 * The world's exports for `plugin`:
 *   { describe: {name, version, entityType, eventTypes, stateSchemaVersion},
 *     init(entityId) -> state,
 *     apply(state, event) -> new state, or undefined to keep the (mutated) state,
 *     project?(entityId, before, after, events) -> [upsert(...), del(...)],
 *     decodeState?(json) -> state  (check/normalize a stored state; throw to reject) }
 * `env.log(level, message)` is where `describe`/`init` failures are also
 * reported besides console.error (the WIT log import in the component).
 */
export function createExports(plugin, env = {}) {
  checkPlugin(plugin);
  const d = plugin.describe;
  const descriptor = {
    name: d.name, version: d.version, entityType: d.entityType,
    eventTypes: [...d.eventTypes], stateSchemaVersion: d.stateSchemaVersion,
  };
  const report = (where, e) => {
    const msg = `refold plugin ${d.name} ${d.version}: ${describeException(e, where)}`;
    try { console.error(msg); } catch { /* no stdio */ }
    try { env.log?.('error', msg); } catch { /* no log */ }
  };

  function encodeState(state, where) {
    const json = stringify(state);
    if (json === undefined) throw new TypeError(`${where}: the state does not encode as JSON (got ${typeof state})`);
    return ENCODER.encode(json);
  }

  function decodeState(bytes, what, firstId) {
    const fail = (why) => err(0, firstId,
      `${what} does not decode as this plugin's state (schema version ${d.stateSchemaVersion}): ${why}`);
    let value;
    try {
      value = parse(UTF8.decode(bytes));
    } catch (e) {
      return fail(e instanceof TypeError ? `invalid UTF-8 (${e.message})` : e.message);
    }
    if (plugin.decodeState) {
      try {
        value = plugin.decodeState(value);
      } catch (e) {
        return fail(e instanceof PluginError ? e.message : describeException(e, 'decodeState'));
      }
    }
    return { tag: 'ok', val: value };
  }

  const firstId = (batch) => (batch.events.length > 0 ? idOf(batch.bytes, batch.events[0]) : '');

  function describe() {
    return descriptor;
  }

  function init(entityId) {
    try {
      return encodeState(plugin.init(entityId), 'init');
    } catch (e) {
      report('init', e);
      throw e;
    }
  }

  function fold(entityId, stateBytes, batch) {
    const decoded = decodeState(stateBytes, 'state', firstId(batch));
    if (decoded.tag === 'err') return decoded;
    let state = decoded.val;
    const bytes = batch.bytes;
    for (let index = 0; index < batch.events.length; index++) {
      const h = batch.events[index];
      let event;
      try {
        event = readEvent(bytes, h);
      } catch (e) {
        if (!(e instanceof Malformed)) throw e;
        return err(index, idOf(bytes, h), `malformed event from the host: ${e.message}`);
      }
      try {
        const next = plugin.apply(state, event);
        if (isThenable(next)) throw new TypeError('apply returned a Promise: apply must be synchronous');
        if (next !== undefined) state = next;
      } catch (e) {
        return err(index, event.id, describeException(e, 'apply'));
      }
    }
    try {
      return { tag: 'ok', val: encodeState(state, 'fold') };
    } catch (e) {
      // Not a property of an event: name the last one, the state is unusable.
      const last = batch.events.length - 1;
      return err(Math.max(last, 0), last >= 0 ? idOf(bytes, batch.events[last]) : '',
        describeException(e, 'fold (encoding the state)'));
    }
  }

  function project(entityId, beforeBytes, afterBytes, batch) {
    const first = firstId(batch);
    const before = decodeState(beforeBytes, 'state-before', first);
    if (before.tag === 'err') return before;
    const after = decodeState(afterBytes, 'state-after', first);
    if (after.tag === 'err') return after;
    const events = decodeBatch(batch);
    if (events.tag === 'err') return events;
    if (!plugin.project) return { tag: 'ok', val: [] };
    try {
      const ops = plugin.project(entityId, before.val, after.val, events.val);
      if (isThenable(ops)) throw new TypeError('project returned a Promise: project must be synchronous');
      if (ops == null) return { tag: 'ok', val: [] };
      if (!Array.isArray(ops)) throw new TypeError('project must return an array of ops');
      return { tag: 'ok', val: ops.map(encodeOp) };
    } catch (e) {
      // A failure of project concerns the batch, not one event: reported at
      // index 0, like a state that does not decode.
      return err(0, first, describeException(e, 'project'));
    }
  }

  return { describe, init, fold, project };
}

/** Encode a batch the way the host does (for tests): events are
 * `{ id, type, source?, time?, data? (JSON text), position? }`. */
export function encodeBatch(events) {
  const parts = [];
  let offset = 0;
  const span = (s) => {
    const b = ENCODER.encode(s);
    parts.push(b);
    const sp = { offset, len: b.length };
    offset += b.length;
    return sp;
  };
  const headers = events.map((e, i) => ({
    id: span(e.id),
    eventType: span(e.type),
    source: span(e.source ?? '/test'),
    time: e.time == null ? undefined : span(e.time),
    data: span(e.data ?? ''),
    position: BigInt(e.position ?? i + 1),
  }));
  const bytes = new Uint8Array(offset);
  let at = 0;
  for (const p of parts) { bytes.set(p, at); at += p.length; }
  return { bytes, events: headers };
}
