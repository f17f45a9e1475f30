// JSON for refold states, event data and documents, exact for integers.
//
// JSON.parse turns every number into a double, so an integer beyond 2^53
// silently changes and `12.0` cannot be told from `12`. This parser:
//   - gives an integer literal (no fraction, no exponent) as a Number when it
//     is a safe integer (|n| <= 2^53 - 1) and as a BigInt otherwise, exactly;
//   - gives any other number as a Number;
//   - records, on each object it returns, the source text of its numeric
//     members in a hidden (non-enumerable, symbol-keyed) table, so that
//     `literal(obj, key)` can tell `12.0` from `12` (see core.js `fields`).
// stringify() writes compact JSON in insertion key order and writes a BigInt
// as its digits, so what parse() read encodes back to the same number.

const LITERALS = Symbol('refold.json.literals');

export class JsonSyntaxError extends SyntaxError {
  constructor(message, offset) {
    super(message);
    this.name = 'JsonSyntaxError';
    this.offset = offset;
  }
}

/** The numeric literal that `obj[key]` was parsed from, or undefined. */
export function literal(obj, key) {
  const table = obj !== null && typeof obj === 'object' ? obj[LITERALS] : undefined;
  return table === undefined ? undefined : table[key];
}

const WS = new Set([0x20, 0x09, 0x0a, 0x0d]);
const NUMBER = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;
const MAX_DEPTH = 128; // serde_json's default recursion limit

/** Parse JSON text (a string). Throws JsonSyntaxError. */
export function parse(text) {
  let i = 0;
  const n = text.length;
  const fail = (what) => {
    // line/column like serde_json, for the reader
    let line = 1, col = 1;
    for (let k = 0; k < i && k < n; k++) {
      if (text.charCodeAt(k) === 0x0a) { line++; col = 1; } else col++;
    }
    throw new JsonSyntaxError(`${what} at line ${line} column ${col}`, i);
  };
  const skip = () => { while (i < n && WS.has(text.charCodeAt(i))) i++; };

  function str() {
    // at the opening quote
    i++;
    let out = '';
    let start = i;
    for (;;) {
      if (i >= n) fail('EOF while parsing a string');
      const c = text.charCodeAt(i);
      if (c === 0x22) { out += text.slice(start, i); i++; return out; }
      if (c < 0x20) fail('control character (\\u0000-\\u001F) found while parsing a string');
      if (c !== 0x5c) { i++; continue; }
      out += text.slice(start, i);
      i++;
      const e = text[i++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          const hex = text.slice(i, i + 4);
          if (!/^[0-9a-fA-F]{4}$/.test(hex)) fail('invalid escape');
          out += String.fromCharCode(parseInt(hex, 16));
          i += 4;
          break;
        }
        default: i--; fail('invalid escape');
      }
      start = i;
    }
  }

  function num() {
    NUMBER.lastIndex = i;
    const m = NUMBER.exec(text);
    if (m === null) fail('invalid number');
    const raw = m[0];
    i += raw.length;
    if (m[1] === undefined && m[2] === undefined) {
      const v = Number(raw);
      return [Number.isSafeInteger(v) ? v : BigInt(raw), raw];
    }
    const v = Number(raw);
    if (!Number.isFinite(v)) fail('number out of range');
    return [v, raw];
  }

  function value(depth) {
    skip();
    if (i >= n) fail('EOF while parsing a value');
    const c = text[i];
    if (c === '{') {
      if (depth >= MAX_DEPTH) fail('recursion limit exceeded');
      i++;
      const obj = {};
      let literals;
      skip();
      if (text[i] === '}') { i++; return obj; }
      for (;;) {
        skip();
        if (text[i] !== '"') fail(i >= n ? 'EOF while parsing an object' : 'key must be a string');
        const key = str();
        skip();
        if (text[i] !== ':') fail(i >= n ? 'EOF while parsing an object' : 'expected `:`');
        i++;
        skip();
        let v;
        const ch = text[i];
        if (ch === '-' || (ch >= '0' && ch <= '9')) {
          const [nv, raw] = num();
          v = nv;
          (literals ??= Object.create(null))[key] = raw;
        } else {
          v = value(depth + 1);
          if (literals !== undefined) delete literals[key];
        }
        if (key === '__proto__') {
          Object.defineProperty(obj, key, { value: v, enumerable: true, writable: true, configurable: true });
        } else {
          obj[key] = v;
        }
        skip();
        if (text[i] === ',') { i++; continue; }
        if (text[i] === '}') { i++; break; }
        fail(i >= n ? 'EOF while parsing an object' : 'expected `,` or `}`');
      }
      if (literals !== undefined) Object.defineProperty(obj, LITERALS, { value: literals });
      return obj;
    }
    if (c === '[') {
      if (depth >= MAX_DEPTH) fail('recursion limit exceeded');
      i++;
      const arr = [];
      skip();
      if (text[i] === ']') { i++; return arr; }
      for (;;) {
        arr.push(value(depth + 1));
        skip();
        if (text[i] === ',') { i++; continue; }
        if (text[i] === ']') { i++; return arr; }
        fail(i >= n ? 'EOF while parsing a list' : 'expected `,` or `]`');
      }
    }
    if (c === '"') return str();
    if (c === '-' || (c >= '0' && c <= '9')) return num()[0];
    for (const [word, v] of [['true', true], ['false', false], ['null', null]]) {
      if (text.startsWith(word, i)) { i += word.length; return v; }
    }
    fail('expected value');
  }

  const v = value(0);
  skip();
  if (i < n) fail('trailing characters');
  return v;
}

/**
 * Compact JSON in insertion key order; BigInt as digits; like JSON.stringify
 * otherwise (toJSON is called, undefined/function members are left out,
 * non-finite numbers become null). Throws TypeError on a cycle.
 */
export function stringify(value) {
  const out = [];
  const seen = new Set();
  const write = (v, inArray) => {
    if (v !== null && typeof v === 'object' && typeof v.toJSON === 'function') v = v.toJSON();
    switch (typeof v) {
      case 'string': out.push(JSON.stringify(v)); return true;
      case 'number': out.push(Number.isFinite(v) ? String(v) : 'null'); return true;
      case 'bigint': out.push(v.toString()); return true;
      case 'boolean': out.push(v ? 'true' : 'false'); return true;
      case 'undefined': case 'function': case 'symbol':
        if (inArray) { out.push('null'); return true; }
        return false;
    }
    if (v === null) { out.push('null'); return true; }
    if (v instanceof Number || v instanceof String || v instanceof Boolean) {
      return write(v.valueOf(), inArray);
    }
    if (seen.has(v)) throw new TypeError('cyclic value does not encode as JSON');
    seen.add(v);
    if (Array.isArray(v)) {
      out.push('[');
      for (let k = 0; k < v.length; k++) {
        if (k > 0) out.push(',');
        write(v[k], true);
      }
      out.push(']');
    } else {
      out.push('{');
      let first = true;
      for (const key of Object.keys(v)) {
        const mark = out.length;
        out.push(first ? '' : ',', JSON.stringify(key), ':');
        if (write(v[key], false)) first = false;
        else out.length = mark;
      }
      out.push('}');
    }
    seen.delete(v);
    return true;
  };
  if (!write(value, false)) return undefined;
  return out.join('');
}
