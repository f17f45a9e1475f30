package refold.bench.kstreams;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.io.UncheckedIOException;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serializer;

/**
 * The aggregate state as JSON bytes, as refold stores it, so that both
 * engines pay for encoding and decoding the same document on every update.
 */
public final class AccountSerde implements Serde<Account> {
    static final ObjectMapper JSON = new ObjectMapper();

    @Override
    public Serializer<Account> serializer() {
        return (topic, account) -> {
            if (account == null) {
                return null;
            }
            try {
                return JSON.writeValueAsBytes(account);
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        };
    }

    @Override
    public Deserializer<Account> deserializer() {
        return (topic, bytes) -> {
            if (bytes == null) {
                return null;
            }
            try {
                return JSON.readValue(bytes, Account.class);
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        };
    }
}
