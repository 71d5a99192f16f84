//! How the etcd store splits a batch too large for one transaction, and
//! the journal that makes it whole again after a crash. Pure: no I/O.
//!
//! etcd refuses a request larger than `--max-request-bytes` (1.5 MiB by
//! default) and a transaction of more than `--max-txn-ops` (128) operations.
//! A batch is therefore applied in *parts* bounded by both, and journaled
//! first in *chunks* bounded by bytes. The journal's *head* names the
//! chunks; written after every chunk, it is the batch's commit point. A
//! journal without its head (a leader that died while writing chunks) was
//! never committed: none of its writes were applied, and it is deleted.

use super::StoreError;
use std::ops::Range;

/// One write as etcd sees it: a key and its new value (`None`: deleted).
pub type Op = (String, Option<Vec<u8>>);

/// Bytes of one transaction's keys and values, under etcd's default
/// request limit of 1.5 MiB with room for the request's own framing.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;
/// Bytes of one journal chunk (one value, written in its own transaction).
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// What an operation adds to a request beside its key and value.
const OP_OVERHEAD: usize = 16;

/// The size an op adds to a transaction.
fn op_bytes((key, value): &Op) -> usize {
    key.len() + value.as_ref().map_or(0, Vec::len) + OP_OVERHEAD
}

/// Whether `ops` fit in one transaction.
pub fn fits_one_txn(ops: &[Op], max_ops: usize) -> bool {
    ops.len() <= max_ops && ops.iter().map(op_bytes).sum::<usize>() <= MAX_TXN_BYTES
}

/// `ops` cut, in order, into parts of at most `max_ops` operations and
/// [`MAX_TXN_BYTES`] (an op larger than that alone is a part of its own,
/// which etcd may then refuse: the commit fails and nothing is lost).
pub fn parts(ops: &[Op], max_ops: usize) -> Vec<Range<usize>> {
    let max_ops = max_ops.max(1);
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, op) in ops.iter().enumerate() {
        let size = op_bytes(op);
        if i > start && (i - start == max_ops || bytes + size > MAX_TXN_BYTES) {
            parts.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < ops.len() {
        parts.push(start..ops.len());
    }
    parts
}

/// The head of a chunked journal: which batch, and how many chunks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    pub batch: String,
    pub chunks: usize,
}

/// A journal as found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Journal {
    /// Written whole in the head by earlier versions: the ops themselves.
    Whole(Vec<Op>),
    Chunked(Head),
}

/// One op in a chunk: values are the ledger's JSON, kept as text (a byte
/// array in JSON costs up to four bytes per byte).
#[derive(serde::Serialize, serde::Deserialize)]
struct ChunkOp<'a>(
    #[serde(borrow)] std::borrow::Cow<'a, str>,
    #[serde(borrow)] Option<std::borrow::Cow<'a, str>>,
);

/// `ops` as journal chunks of at most [`MAX_CHUNK_BYTES`] each (an op
/// larger than that alone is a chunk of its own). Every value the ledger
/// writes is JSON text; one that is not cannot be journaled.
pub fn encode_chunks(ops: &[Op]) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::with_capacity(4096);
    for (key, value) in ops {
        let value = match value {
            Some(bytes) => Some(std::str::from_utf8(bytes).map_err(|_| {
                StoreError::NotApplied(format!("the value of {key} is not text; cannot journal it"))
            })?),
            None => None,
        };
        let op = serde_json::to_vec(&ChunkOp(key.into(), value.map(Into::into)))
            .map_err(|e| StoreError::NotApplied(e.to_string()))?;
        if chunk.len() > 1 && chunk.len() + op.len() + 1 > MAX_CHUNK_BYTES {
            chunk.push(b']');
            chunks.push(std::mem::replace(&mut chunk, Vec::with_capacity(4096)));
        }
        chunk.push(if chunk.is_empty() { b'[' } else { b',' });
        chunk.extend_from_slice(&op);
    }
    if !chunk.is_empty() {
        chunk.push(b']');
        chunks.push(chunk);
    }
    Ok(chunks)
}

/// The ops of one chunk read back.
pub fn decode_chunk(key: &str, bytes: &[u8]) -> Result<Vec<Op>, StoreError> {
    let ops: Vec<ChunkOp> = serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))?;
    Ok(ops
        .into_iter()
        .map(|ChunkOp(k, v)| (k.into_owned(), v.map(|v| v.into_owned().into_bytes())))
        .collect())
}

pub fn encode_head(head: &Head) -> Vec<u8> {
    serde_json::to_vec(head).expect("a head always serializes")
}

/// A head read back: this version's, or the whole journal of an earlier one.
pub fn decode_head(key: &str, bytes: &[u8]) -> Result<Journal, StoreError> {
    if bytes.first() == Some(&b'[') {
        let ops: Vec<Op> = serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))?;
        return Ok(Journal::Whole(ops));
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))?;
    if head.batch.is_empty()
        || head.batch.len() > 32
        || !head.batch.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(corrupt(key, "the batch name is not 1-32 letters or digits"));
    }
    Ok(Journal::Chunked(head))
}

/// The key of chunk `index` of `batch`, under `dir` (the journal's chunk
/// directory, ending in `/`).
pub fn chunk_key(dir: &str, batch: &str, index: usize) -> String {
    format!("{dir}{batch}/{index:06}")
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_op() -> impl Strategy<Value = Op> {
        (
            "[ -~]{1,40}",
            prop::option::of(prop_oneof![
                "[ -~\u{80}-\u{10ffff}]{0,300}".prop_map(String::into_bytes),
                (1usize..200_000).prop_map(|n| format!("\"{}\"", "v".repeat(n)).into_bytes()),
            ]),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn any_text_ops_journal_and_read_back_exactly_in_bounded_chunks(
            ops in prop::collection::vec(any_op(), 0..60)
        ) {
            let chunks = encode_chunks(&ops).unwrap();
            let mut back = Vec::new();
            for chunk in &chunks {
                let single_op = decode_chunk("c", chunk).unwrap();
                prop_assert!(chunk.len() <= MAX_CHUNK_BYTES || single_op.len() == 1);
                back.extend(single_op);
            }
            prop_assert_eq!(back, ops.clone());
            let mut next = 0;
            for part in parts(&ops, 7) {
                prop_assert_eq!(part.start, next);
                prop_assert!(part.len() <= 7);
                prop_assert!(fits_one_txn(&ops[part.clone()], 7) || part.len() == 1);
                next = part.end;
            }
            prop_assert_eq!(next, ops.len());
        }

        #[test]
        fn any_bytes_as_a_head_or_a_chunk_are_read_or_refused_never_a_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..200)
        ) {
            let _ = decode_head("h", &bytes);
            let _ = decode_chunk("c", &bytes);
        }
    }

    fn op(key: &str, value_len: usize) -> Op {
        (
            key.to_string(),
            Some(format!("\"{}\"", "x".repeat(value_len)).into_bytes()),
        )
    }

    #[test]
    fn parts_keep_order_and_stay_under_both_limits() {
        let ops: Vec<Op> = (0..1000)
            .map(|i| match i % 3 {
                0 => op(&format!("/k/{i}"), 10),
                1 => op(&format!("/k/{i}"), 40_000),
                _ => (format!("/k/{i}"), None),
            })
            .collect();
        let parts = parts(&ops, 120);
        let mut next = 0;
        for part in &parts {
            assert_eq!(part.start, next, "parts are contiguous and in order");
            assert!(!part.is_empty());
            assert!(part.len() <= 120);
            assert!(fits_one_txn(&ops[part.clone()], 120), "{part:?}");
            next = part.end;
        }
        assert_eq!(next, ops.len(), "every op is in a part");
        // Bytes, not the op count, cut these: 40 KB values, 1 MiB a part.
        assert!(parts.len() > 1000 / 120 + 1, "{}", parts.len());
    }

    #[test]
    fn an_op_larger_than_a_transaction_is_a_part_of_its_own() {
        let ops = vec![op("/a", 10), op("/big", MAX_TXN_BYTES + 1), op("/b", 10)];
        assert_eq!(parts(&ops, 120), vec![0..1, 1..2, 2..3]);
        assert!(!fits_one_txn(&ops, 120));
        assert!(fits_one_txn(&ops[..1], 120));
    }

    #[test]
    fn chunks_read_back_to_the_ops_in_order_and_stay_under_their_bound() {
        let ops: Vec<Op> = (0..5000)
            .map(|i| match i % 2 {
                0 => op(&format!("/allot/counters/key/k{i}"), 900),
                _ => (format!("/allot/slices/a/k{i}"), None),
            })
            .collect();
        let chunks = encode_chunks(&ops).unwrap();
        assert!(chunks.len() > 1, "{}", chunks.len());
        let mut back = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(chunk.len() <= MAX_CHUNK_BYTES, "chunk {i}: {}", chunk.len());
            back.extend(decode_chunk("c", chunk).unwrap());
        }
        assert_eq!(back, ops);
        // Text values are not blown up four times as a byte array would be.
        let raw: usize = ops.iter().map(op_bytes).sum();
        let journaled: usize = chunks.iter().map(Vec::len).sum();
        assert!(journaled < raw * 2, "{journaled} bytes for {raw}");
    }

    #[test]
    fn a_value_that_is_not_text_cannot_be_journaled() {
        let ops = vec![("/k".to_string(), Some(vec![0xff, 0xfe]))];
        assert!(matches!(
            encode_chunks(&ops),
            Err(StoreError::NotApplied(_))
        ));
    }

    #[test]
    fn a_head_reads_back_and_an_earlier_versions_whole_journal_still_replays() {
        let head = Head {
            batch: "0a1b2c".into(),
            chunks: 3,
        };
        assert_eq!(
            decode_head("h", &encode_head(&head)).unwrap(),
            Journal::Chunked(head)
        );
        let ops: Vec<Op> = vec![
            ("/allot/accounts/a".into(), Some(b"{}".to_vec())),
            ("/x".into(), None),
        ];
        let legacy = serde_json::to_vec(&ops).unwrap();
        assert_eq!(decode_head("h", &legacy).unwrap(), Journal::Whole(ops));
    }

    #[test]
    fn a_malformed_head_or_chunk_is_corrupt_not_a_panic() {
        for bad in [
            &b""[..],
            b"{",
            b"[1,2",
            b"{\"batch\":\"\",\"chunks\":1}",
            b"{\"batch\":\"../x\",\"chunks\":1}",
            b"{\"batch\":\"ab\",\"chunks\":-1}",
        ] {
            assert!(
                matches!(decode_head("h", bad), Err(StoreError::Corrupt { .. })),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            decode_chunk("c", b"[[1]]"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
