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
