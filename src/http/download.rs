//! Sending an asset's bytes: conditional requests (`If-None-Match`), single byte ranges
//! (206/416), `Content-Disposition` with non-ASCII names, and either streaming the file
//! ourselves or handing it to nginx with `X-Accel-Redirect`.

use chrono::{DateTime, Timelike, Utc};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use warp::http::{HeaderMap, HeaderValue, Response, StatusCode};
use warp::hyper::Body;

use super::error::ApiError;
use crate::blobs::BlobStore;
use crate::projections::read::AssetInfo;

/// Bytes read from disk per chunk of a streamed download.
const READ_CHUNK: usize = 256 * 1024;

/// What a `Range` header asks of a representation of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// No range, or one we ignore (several ranges, malformed): send everything.
    Full,
    /// Bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// A well-formed range that selects nothing: 416.
    Unsatisfiable,
}

/// Parses a `Range` header per RFC 9110 §14: only a single `bytes` range is served;
/// anything else is ignored (the whole representation is sent), as the RFC allows.
pub fn parse_range(header: Option<&str>, size: u64) -> ByteRange {
    // The unit is case-insensitive (RFC 9110 §14.1).
    let Some(spec) = header
        .map(|h| h.trim_matches(' '))
        .and_then(|h| h.get(..6).filter(|unit| unit.eq_ignore_ascii_case("bytes=")).map(|_| &h[6..]))
    else {
        return ByteRange::Full;
    };
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((first, last)) = spec.trim_matches(' ').split_once('-') else {
        return ByteRange::Full;
    };
    // Only spaces around numbers, and at most 18 digits: what nginx accepts too, so a
    // range handed to it with X-Accel-Redirect is read the same way.
    if spec.contains(|c: char| c.is_whitespace() && c != ' ') {
        return ByteRange::Full;
    }
    let number = |s: &str| -> Option<u64> {
        let s = s.trim_matches(' ');
        (!s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    match (first.trim().is_empty(), number(first), number(last)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(suffix)) => {
            if suffix == 0 || size == 0 {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Partial { start: size.saturating_sub(suffix), end: size - 1 }
            }
        }
        // bytes=A- : from A to the end.
        (false, Some(start), None) if last.trim().is_empty() => {
            if start >= size {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Partial { start, end: size - 1 }
            }
        }
        // bytes=A-B
        (false, Some(start), Some(end)) if start <= end => {
            if start >= size {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Partial { start, end: end.min(size - 1) }
            }
        }
        _ => ByteRange::Full,
    }
}

/// RFC 5987 `attr-char`: what may stand unencoded in `filename*`.
const ATTR_CHAR: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// `attachment; filename="<ASCII fallback>"; filename*=UTF-8''<encoded>` (RFC 6266).
pub fn content_disposition(filename: &str) -> String {
    let fallback: String = filename
        .chars()
        .map(|c| if c.is_ascii() && !c.is_ascii_control() && c != '"' && c != '\\' { c } else { '_' })
        .collect();
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{}", utf8_percent_encode(filename, ATTR_CHAR))
}

pub fn etag(asset: &AssetInfo) -> String {
    format!("\"sha256:{}\"", asset.asset_sha256)
}

/// Whether an entity-tag list (`If-None-Match`, `If-Match`) names `etag` or is `*`.
/// `weak`: W/ prefixes are ignored (If-None-Match); otherwise they never match (If-Match).
fn etag_listed(header: &str, etag: &str, weak: bool) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag == etag || (weak && tag.strip_prefix("W/") == Some(etag)))
}

/// An HTTP date (`Last-Modified` / `If-Modified-Since` style).
fn http_date(value: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc2822(value.trim()).ok().map(|d| d.with_timezone(&Utc))
}

/// How the bytes leave the process.
pub enum Delivery<'a> {
    /// Stream the file from the blob store.
    Direct,
    /// Let nginx send it: `X-Accel-Redirect: <prefix><ab>/<cd>/<uuid>`.
    AccelRedirect(&'a str),
}

/// The full answer to a GET (or HEAD) of `asset`: preconditions (RFC 9110 §13.2.2 order),
/// then the range, then the bytes. Every decision is made here, so both deliveries
/// answer alike; nginx is only handed plain full downloads, which it answers the same way.
pub async fn respond(
    asset: &AssetInfo,
    request: &HeaderMap,
    is_head: bool,
    blobs: &BlobStore,
    delivery: Delivery<'_>,
) -> Result<Response<Body>, ApiError> {
    let header = |name: &str| request.get(name).and_then(|v| v.to_str().ok());
    let etag = etag(asset);
    let size = asset.asset_file_size.max(0) as u64;
    // HTTP dates have whole seconds: compare at that precision.
    let modified = asset.asset_created_at.with_nanosecond(0).unwrap_or(asset.asset_created_at);
    let mut builder = Response::builder()
        .header("etag", &etag)
        .header("cache-control", "private, no-cache")
        .header("last-modified", modified.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
        .header("x-content-type-options", "nosniff");

    let precondition_failed = || {
        ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            "the asset does not match the precondition",
        )
    };
    match (header("if-match"), header("if-unmodified-since").and_then(http_date)) {
        (Some(tags), _) if !etag_listed(tags, &etag, false) => return Err(precondition_failed()),
        (None, Some(since)) if modified > since => return Err(precondition_failed()),
        _ => {}
    }
    let not_modified = match (header("if-none-match"), header("if-modified-since").and_then(http_date)) {
        (Some(tags), _) => etag_listed(tags, &etag, true),
        (None, Some(since)) => modified <= since,
        (None, None) => false,
    };
    if not_modified {
        return builder.status(StatusCode::NOT_MODIFIED).body(Body::empty()).map_err(ApiError::internal);
    }
    builder = builder
        .header(
            "content-type",
            HeaderValue::from_str(&asset.asset_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
        )
        .header("content-disposition", content_disposition(&asset.asset_original_filename));

    // Ranges apply to GET only; If-Range honours one only while the representation is
    // the one named.
    let range_header = match header("if-range").map(str::trim) {
        _ if is_head => None,
        // An entity tag must be ours; a date must be our Last-Modified exactly.
        Some(validator) if validator != etag && http_date(validator) != Some(modified) => None,
        _ => header("range"),
    };
    let range = parse_range(range_header, size);
    if range == ByteRange::Unsatisfiable {
        return Err(ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_not_satisfiable",
            format!("the asset has {size} bytes"),
        )
        .with_header("content-range", format!("bytes */{size}")));
    }

    // nginx parses Range and preconditions by its own rules (stricter on whitespace and
    // numbers, and it cannot see what its proxying already normalised), so only plain
    // full downloads are handed over; ranges and conditional requests are served here.
    let nginx_would_agree = !is_head
        && ["range", "if-match", "if-unmodified-since", "if-range"].iter().all(|name| request.get(*name).is_none());
    if let (Delivery::AccelRedirect(prefix), true) = (delivery, nginx_would_agree) {
        let path = blobs.path(asset.asset_uuid);
        if tokio::fs::metadata(&path).await.is_err() {
            return Err(ApiError::internal(format!(
                "asset {} is available but {} is missing",
                asset.asset_uuid,
                path.display()
            )));
        }
        // nginx sends the bytes (applying the same single range) and its own Accept-Ranges.
        let location = format!("{prefix}{}", BlobStore::relative_path(asset.asset_uuid));
        return builder.header("x-accel-redirect", location).body(Body::empty()).map_err(ApiError::internal);
    }

    builder = builder.header("accept-ranges", "bytes");
    let (status, start, length) = match range {
        ByteRange::Partial { start, end } => {
            builder = builder.header("content-range", format!("bytes {start}-{end}/{size}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        _ => (StatusCode::OK, 0, size),
    };
    builder = builder.status(status).header("content-length", length);
    if is_head {
        // Answer HEAD as GET would: an asset whose bytes are missing is not a 200.
        if tokio::fs::metadata(blobs.path(asset.asset_uuid)).await.is_err() {
            return Err(ApiError::internal(format!(
                "asset {} is available but its bytes are missing",
                asset.asset_uuid
            )));
        }
        return builder.body(Body::empty()).map_err(ApiError::internal);
    }
    let mut file = blobs.open_read(asset.asset_uuid).await.map_err(|error| {
        ApiError::internal(format!("asset {} is available but its bytes cannot be opened: {error}", asset.asset_uuid))
    })?;
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start)).await.map_err(ApiError::internal)?;
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(length), READ_CHUNK);
    builder.body(Body::wrap_stream(stream)).map_err(ApiError::internal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn single_ranges_are_served_and_others_ignored() {
        assert_eq!(parse_range(None, 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), ByteRange::Partial { start: 0, end: 4 });
        assert_eq!(parse_range(Some("bytes=5-"), 10), ByteRange::Partial { start: 5, end: 9 });
        assert_eq!(parse_range(Some("bytes=-3"), 10), ByteRange::Partial { start: 7, end: 9 });
        assert_eq!(parse_range(Some("bytes=-30"), 10), ByteRange::Partial { start: 0, end: 9 });
        assert_eq!(parse_range(Some("bytes=8-100"), 10), ByteRange::Partial { start: 8, end: 9 });
        assert_eq!(parse_range(Some("bytes=10-"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=10-20"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=4-2"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=a-b"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=+1-2"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=\t0-4"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=0-9223372036854775808"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes= 0-4"), 10), ByteRange::Partial { start: 0, end: 4 });
        assert_eq!(parse_range(Some("bytes=0-5\t"), 10), ByteRange::Full);
    }

    #[test]
    fn content_disposition_keeps_non_ascii_names() {
        assert_eq!(
            content_disposition("résumé \"final\".pdf"),
            "attachment; filename=\"r_sum_ _final_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.pdf"
        );
    }

    #[test]
    fn entity_tags_compare_weakly_for_if_none_match_and_strongly_for_if_match() {
        let tag = "\"sha256:ab\"";
        assert!(etag_listed("\"sha256:ab\"", tag, true));
        assert!(etag_listed("W/\"sha256:ab\", \"x\"", tag, true));
        assert!(!etag_listed("W/\"sha256:ab\"", tag, false));
        assert!(etag_listed("*", tag, false));
        assert!(!etag_listed("\"other\"", tag, true));
        assert_eq!(parse_range(Some("BYTES=1-2"), 10), ByteRange::Partial { start: 1, end: 2 });
        assert_eq!(http_date("Wed, 25 Nov 2026 01:43:05 GMT").map(|d| d.timestamp()), Some(1795570985));
    }

    proptest! {
        #[test]
        fn served_ranges_stay_inside_the_file(header in "bytes=[0-9]{0,4}-[0-9]{0,4}", size in 0u64..5000) {
            match parse_range(Some(&header), size) {
                ByteRange::Partial { start, end } => prop_assert!(start <= end && end < size),
                ByteRange::Full | ByteRange::Unsatisfiable => {}
            }
        }
    }
}
