//! Properties the fuzz targets (fuzz/) check on arbitrary input, replayed over the committed
//! corpora by a normal test. Each function panics when a property fails, and only then.

use http::{HeaderMap, HeaderValue};

use crate::pipeline::serve::{MAX_RANGES, RangeAnswer, ranges};

/// Range: whatever the header says, every range served lies inside the body, there are at
/// most `MAX_RANGES`, and several ranges never overlap (no amplification).
pub fn range(data: &[u8]) {
    let (len_bytes, header) = data.split_at(data.len().min(4));
    let mut len = [0u8; 4];
    len[..len_bytes.len()].copy_from_slice(len_bytes);
    let len = u64::from(u32::from_le_bytes(len) % (1 << 20));
    let Ok(value) = HeaderValue::from_bytes(header) else {
        return;
    };
    let mut request = HeaderMap::new();
    request.insert(http::header::RANGE, value);
    let stored = HeaderMap::new();
    match ranges(&request, &stored, len) {
        RangeAnswer::Full | RangeAnswer::Unsatisfiable => {}
        RangeAnswer::Single(start, end) => {
            assert!(start <= end && end < len, "{start}-{end}/{len}")
        }
        RangeAnswer::Multiple(parts) => {
            assert!(parts.len() >= 2 && parts.len() <= MAX_RANGES);
            for (start, end) in &parts {
                assert!(start <= end && *end < len, "{start}-{end}/{len}");
            }
            let mut sorted = parts.clone();
            sorted.sort_unstable();
            assert!(
                sorted.windows(2).all(|w| w[1].0 > w[0].1),
                "overlap: {parts:?}"
            );
        }
    }
}

/// HPACK: a client's header blocks never panic the decoder, its table's bookkeeping holds
/// after each, and a Huffman string that decodes is the encoding of what it decodes to (so no
/// two inputs decode alike by a padding trick).
///
/// The first byte picks how the rest is cut into blocks (decoded in turn by one decoder, as
/// a connection's are); the whole input is also tried as one Huffman string.
pub fn hpack(data: &[u8]) {
    use crate::http2::{hpack::Decoder, huffman};
    let mut decoded = Vec::new();
    if huffman::decode(data, &mut decoded).is_ok() {
        assert_eq!(
            huffman::encode(&decoded),
            data,
            "a non-canonical Huffman string decoded"
        );
    }
    let Some((&cut, mut rest)) = data.split_first() else {
        return;
    };
    let block_len = usize::from(cut).max(1);
    let mut decoder = Decoder::default();
    while !rest.is_empty() {
        let (block, tail) = rest.split_at(block_len.min(rest.len()));
        rest = tail;
        let outcome = decoder.decode(block, |_, size| {
            assert!(size >= 32, "a field's size counts its 32-byte overhead");
        });
        decoder.check_table();
        if outcome.is_err() {
            // A connection ends at its first bad block.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    /// The HPACK property over inputs no fuzzer has to find: random bytes, and random changes
    /// to valid blocks (RFC 7541 C.4, Huffman-coded), with a fixed seed so a failure repeats.
    #[test]
    fn hpack_holds_on_random_and_mutated_blocks() {
        let valid: &[&[u8]] = &[
            &[
                0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
                0x90, 0xf4, 0xff,
            ],
            &[
                0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
            ],
            &[
                0x82, 0x87, 0x85, 0xbf, 0x40, 0x88, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xa9, 0x7d, 0x7f,
                0x89, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf,
            ],
        ];
        let mut rng = fastrand::Rng::with_seed(0x1a2d_e401);
        for round in 0..20_000 {
            let mut input: Vec<u8> = if round % 2 == 0 {
                (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect()
            } else {
                let mut joined = vec![rng.u8(..)];
                for block in valid {
                    joined.extend_from_slice(block);
                }
                joined
            };
            for _ in 0..rng.usize(0..4) {
                if !input.is_empty() {
                    let at = rng.usize(..input.len());
                    input[at] = rng.u8(..);
                }
            }
            super::hpack(&input);
        }
    }
}
