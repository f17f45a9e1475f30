package refold.bench.kstreams;

import com.fasterxml.jackson.annotation.JsonPropertyOrder;
import com.fasterxml.jackson.databind.JsonNode;

/**
 * The state of one account, with the same fields, field order, JSON shape and
 * rules as refold's bank plugin (plugins/bank/src/lib.rs, state schema 1):
 * {"owner":null,"balance":0,"transactions":0,"open":false}.
 */
@JsonPropertyOrder({"owner", "balance", "transactions", "open"})
public final class Account {
    public String owner;
    /** In cents. */
    public long balance;
    /** Deposits and withdrawals applied (a u64 in refold; never near the i64 limit here). */
    public long transactions;
    public boolean open;

    public static Account initial() {
        return new Account();
    }

    /** An event whose data does not fit its type, or a balance that would overflow. */
    public static final class FoldError extends Exception {
        FoldError(String message) {
            super(message, null, false, false); // no stack trace: errors are counted, not logged
        }
    }

    /**
     * Applies one structured-mode CloudEvent. On a FoldError the state is left
     * as it was: every check runs before the first field is assigned.
     */
    public void apply(JsonNode event) throws FoldError {
        JsonNode type = event.get("type");
        if (type == null || !type.isTextual()) {
            throw new FoldError("not a CloudEvent: no string \"type\"");
        }
        switch (type.textValue()) {
            case "account.opened" -> {
                JsonNode o = data(event).get("owner");
                if (o == null || !o.isTextual()) {
                    throw new FoldError("account.opened: \"owner\" is not a string");
                }
                owner = o.textValue();
                open = true;
            }
            case "account.deposited" -> {
                long a = amount(event);
                try {
                    balance = Math.addExact(balance, a);
                } catch (ArithmeticException e) {
                    throw new FoldError("deposit of " + a + " overflows the balance");
                }
                transactions += 1;
            }
            case "account.withdrawn" -> {
                long a = amount(event);
                try {
                    balance = Math.subtractExact(balance, a);
                } catch (ArithmeticException e) {
                    throw new FoldError("withdrawal of " + a + " overflows the balance");
                }
                transactions += 1;
            }
            case "account.closed" -> open = false;
            default -> { }
        }
    }

    private static JsonNode data(JsonNode event) throws FoldError {
        JsonNode d = event.get("data");
        if (d == null || !d.isObject()) {
            throw new FoldError(event.get("type").textValue() + ": \"data\" is not an object");
        }
        return d;
    }

    /**
     * serde_json's i64 accepts integer literals in range only: 12.5, 1e3,
     * "250" and 2^63 are all rejected, and Jackson parses 1e3 and 12.5 as
     * floating-point nodes and 2^63 as a BigInteger node, hence this test.
     */
    private static long amount(JsonNode event) throws FoldError {
        JsonNode a = data(event).get("amount");
        if (a == null || !a.isIntegralNumber() || !a.canConvertToLong()) {
            throw new FoldError(event.get("type").textValue() + ": \"amount\" is not an i64");
        }
        return a.longValue();
    }
}
