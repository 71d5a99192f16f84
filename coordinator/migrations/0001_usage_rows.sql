-- One row per settled request. The key is the record's identity, so a
-- re-sent record is never a second row. agent_id sorts bytewise (COLLATE
-- "C") so that pages continue in the same order as the embedded store.
CREATE TABLE usage_rows (
    agent_id    TEXT COLLATE "C" NOT NULL,
    epoch       BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    account_id  TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    model       TEXT NOT NULL,
    admitted_at BIGINT NOT NULL,
    batch_id    TEXT NOT NULL,
    origin      INTEGER NOT NULL,
    charged     BOOLEAN NOT NULL,
    cost        NUMERIC NOT NULL,
    settled_at  BIGINT NOT NULL,
    -- The whole row (allot.v1.UsageRow, protobuf).
    row         BYTEA NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq)
);

CREATE INDEX usage_rows_key ON usage_rows (key_id, admitted_at);
CREATE INDEX usage_rows_account ON usage_rows (account_id, admitted_at);
CREATE INDEX usage_rows_model ON usage_rows (model, admitted_at);
CREATE INDEX usage_rows_batch ON usage_rows (batch_id) WHERE batch_id <> '';
