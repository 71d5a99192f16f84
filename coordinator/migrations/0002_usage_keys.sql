-- The account of every key with rows. Account filters go through it and the
-- key index, so usage_rows needs no index of its own on account_id: each
-- index on usage_rows costs a large share of the write throughput.
CREATE TABLE usage_keys (
    key_id     TEXT PRIMARY KEY,
    account_id TEXT NOT NULL
);

CREATE INDEX usage_keys_account ON usage_keys (account_id);

INSERT INTO usage_keys
    SELECT DISTINCT ON (key_id) key_id, account_id FROM usage_rows ORDER BY key_id;

DROP INDEX usage_rows_account;
