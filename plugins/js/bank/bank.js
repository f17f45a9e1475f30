// Example plugin: bank accounts, in JavaScript. The same plugin as the Rust
// plugins/bank (version 1.0.0, without its `v2` feature): entity type
// `account`, amounts in integer cents.
//
// | event type          | data                | effect                                   |
// |---------------------|---------------------|------------------------------------------|
// | `account.opened`    | `{"owner": string}` | `owner` set, `open = true`               |
// | `account.deposited` | `{"amount": int}`   | `balance += amount`, `transactions += 1` |
// | `account.withdrawn` | `{"amount": int}`   | `balance -= amount`, `transactions += 1` |
// | `account.closed`    | anything            | `open = false`                           |
// | any other type      | anything            | nothing                                  |
//
// Data that does not fit its event's schema is a plugin error: a missing or
// non-string `owner`; an `amount` that is missing, a string, a boolean, null,
// written with a fraction or exponent (`12.5`, `12.0`, `1e3`) or outside the
// i64 range; and so is a balance that would overflow an i64
// ("deposit of N overflows the balance"). Integers are exact at any size:
// the SDK decodes integers beyond 2^53 as BigInt and the arithmetic here is
// done in BigInt, so the limits are exactly those of the Rust plugin's i64.
//
// State (schema version 1), initially
// `{"owner":null,"balance":0,"transactions":0,"open":false}`, always encoded
// with its keys in that order.
//
// Projection `balances`, one document per owner, key = owner:
// `{"owner","account","balance","open"}`, upserted after every batch of an
// account that has an owner. When an account's owner changes (a second
// `account.opened`), the old owner's document is deleted. Two accounts with
// the same owner share one document: the last batch wins.
import { definePlugin, PluginError, fields, upsert, del } from '../refold-sdk/index.js';

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;
const U64_MAX = 2n ** 64n - 1n;

/** A Number when it is a safe integer, else the BigInt (encodes exactly). */
const int = (b) => (b >= BigInt(Number.MIN_SAFE_INTEGER) && b <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(b) : b);

const account = (owner, balance, transactions, open) => ({ owner, balance, transactions, open });

/** Like `amount.checked_add` on the Rust side: the new balance or a plugin error. */
function move(balance, amount, sign, what) {
  const next = BigInt(balance) + sign * BigInt(amount);
  if (next < I64_MIN || next > I64_MAX) throw new PluginError(`${what} of ${amount} overflows the balance`);
  return int(next);
}

function count(transactions) {
  const next = BigInt(transactions) + 1n;
  if (next > U64_MAX) throw new PluginError('transactions overflows a u64');
  return int(next);
}

export const bank = {
  describe: {
    name: 'bank',
    version: '1.0.0',
    entityType: 'account',
    eventTypes: ['account.opened', 'account.deposited', 'account.withdrawn', 'account.closed'],
    stateSchemaVersion: 1,
  },

  init(_entityId) {
    return account(null, 0, 0, false);
  },

  // A stored state must have the documented shape, as serde requires of the
  // Rust plugin's `Account`; it is rebuilt in key order.
  decodeState(json) {
    const s = fields(json, { owner: 'string?', balance: 'i64', transactions: 'u64', open: 'bool' }, 'state');
    return account(s.owner ?? null, s.balance, s.transactions, s.open);
  },

  apply(s, event) {
    switch (event.type) {
      case 'account.opened': {
        const { owner } = event.fields({ owner: 'string' });
        return account(owner, s.balance, s.transactions, true);
      }
      case 'account.deposited': {
        const { amount } = event.fields({ amount: 'i64' });
        return account(s.owner, move(s.balance, amount, 1n, 'deposit'), count(s.transactions), s.open);
      }
      case 'account.withdrawn': {
        const { amount } = event.fields({ amount: 'i64' });
        return account(s.owner, move(s.balance, amount, -1n, 'withdrawal'), count(s.transactions), s.open);
      }
      case 'account.closed':
        return account(s.owner, s.balance, s.transactions, false);
      default:
        return s; // unknown event types leave the state unchanged
    }
  },

  project(entityId, before, after, _events) {
    const ops = [];
    if (before.owner !== null && after.owner !== before.owner) ops.push(del('balances', before.owner));
    if (after.owner !== null) {
      ops.push(upsert('balances', after.owner, {
        owner: after.owner, account: entityId, balance: after.balance, open: after.open,
      }));
    }
    return ops;
  },
};

export const { describe, init, fold, project } = definePlugin(bank);
