//! The agent's usage spool, as a restart reads it back: any bytes, with or
//! without the format-2 header. Reading never panics and never invents a
//! record: what it reads, written again, reads back the same; and every
//! record read is one a frame with a valid checksum (or, in format 1, a
//! length prefix) held.
#![no_main]

use allot_agent::spool::{log_image, parse_log};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the format: 0 reads the bytes as they are,
    // anything else puts the format-2 header in front.
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let bytes = if choice == 0 {
        rest.to_vec()
    } else {
        let mut v = b"ALLOTSP\x02".to_vec();
        v.extend_from_slice(rest);
        v
    };
    let parsed = parse_log(&bytes);
    assert!(parsed.damaged_bytes + parsed.torn_bytes <= bytes.len());
    let image = log_image(parsed.records.iter());
    let again = parse_log(&image);
    assert_eq!(again.records, parsed.records);
    assert_eq!((again.damaged_bytes, again.torn_bytes), (0, 0));
    if choice != 0 {
        // Format 2: every record read has a sequence number.
        assert!(parsed.records.iter().all(|r| r.seq > 0));
    }
});
