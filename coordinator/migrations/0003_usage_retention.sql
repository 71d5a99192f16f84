-- Retention (usage_retention_days) deletes rows by settlement time. A BRIN
-- index: rows arrive roughly in settled_at order, and a BRIN index costs
-- next to nothing on the write path, unlike a B-tree on usage_rows.
CREATE INDEX usage_rows_settled ON usage_rows USING brin (settled_at);
