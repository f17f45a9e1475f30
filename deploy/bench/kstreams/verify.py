#!/usr/bin/env python3
"""Test data and a state check for the peer benchmark.

  verify.py generate FILE N ACCOUNTS [--bad K]
      N bank events over ACCOUNTS accounts in the pattern of deploy/local/bench
      (opened first, then deposits and withdrawals); --bad K replaces K of the
      later events by ones the bank plugin rejects (malformed data, overflow).
  verify.py check EVENTS.jsonl STATES.jsonl
      fold EVENTS by the bank plugin's rules (plugins/bank/src/lib.rs) and
      compare with the states written by `run --states-out`; prints a summary,
      exits 1 on any difference.
"""
import json, random, sys

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


def event(i, acc, ty, data):
    return {"specversion": "1.0", "id": "b-%d" % i, "source": "/bench", "type": ty,
            "subject": "acc-%d" % acc, "entitytype": "account", "data": data}


def generate(path, n, accounts, bad=0):
    rng = random.Random(7)
    bad_at = set(rng.sample(range(accounts, n), bad)) if bad else set()
    shapes = [("account.deposited", {"amount": "250"}), ("account.deposited", {"amount": 12.5}),
              ("account.withdrawn", {}), ("account.opened", {"name": "x"}),
              ("account.deposited", {"amount": I64_MAX}), ("account.withdrawn", {"amount": I64_MAX})]
    with open(path, "w") as f:
        for i in range(n):
            acc = i % accounts
            if i in bad_at:
                ty, data = shapes[i % len(shapes)]
            elif i < accounts:
                ty, data = "account.opened", {"owner": "owner-%d" % acc}
            elif i % 3 == 0:
                ty, data = "account.withdrawn", {"amount": 100}
            elif i % 101 == 0:
                ty, data = "account.closed", None
            else:
                ty, data = "account.deposited", {"amount": 250}
            f.write(json.dumps(event(i, acc, ty, data)) + "\n")


def is_i64(v):
    return isinstance(v, int) and not isinstance(v, bool) and I64_MIN <= v <= I64_MAX


def apply(s, e):
    """The new state, or None when the bank plugin would reject the event."""
    ty, d = e.get("type"), e.get("data")
    s = dict(s)
    if ty == "account.opened":
        if not isinstance(d, dict) or not isinstance(d.get("owner"), str):
            return None
        s["owner"], s["open"] = d["owner"], True
    elif ty in ("account.deposited", "account.withdrawn"):
        if not isinstance(d, dict) or not is_i64(d.get("amount")):
            return None
        b = s["balance"] + d["amount"] if ty == "account.deposited" else s["balance"] - d["amount"]
        if not I64_MIN <= b <= I64_MAX:
            return None
        s["balance"], s["transactions"] = b, s["transactions"] + 1
    elif ty == "account.closed":
        s["open"] = False
    return s


def check(events_path, states_path):
    want, errors, n = {}, 0, 0
    for line in open(events_path):
        if not line.strip():
            continue
        e = json.loads(line)
        n += 1
        k = e["subject"]
        s = want.get(k, {"owner": None, "balance": 0, "transactions": 0, "open": False})
        t = apply(s, e)
        if t is None:
            errors += 1
            t = s
        want[k] = t
    got = {}
    for line in open(states_path):
        r = json.loads(line)
        got[r["entity_id"]] = r["state"]
    diff = [k for k in set(want) | set(got) if want.get(k) != got.get(k)]
    print("events %d, entities expected %d, read %d, rejected events %d, differing entities %d"
          % (n, len(want), len(got), errors, len(diff)))
    for k in sorted(diff)[:5]:
        print("  %s: expected %s, got %s" % (k, json.dumps(want.get(k)), json.dumps(got.get(k))))
    return 1 if diff else 0


def main(argv):
    if len(argv) >= 4 and argv[0] == "generate":
        bad = int(argv[argv.index("--bad") + 1]) if "--bad" in argv else 0
        generate(argv[1], int(argv[2]), int(argv[3]), bad)
        return 0
    if len(argv) == 3 and argv[0] == "check":
        return check(argv[1], argv[2])
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
