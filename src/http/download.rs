//! Sending an asset's bytes: conditional requests and single byte ranges (decided in
//! `conditional`: 304/412, 206/416), `Content-Disposition` with non-ASCII names, and
//! either streaming the file ourselves or handing it to nginx with `X-Accel-Redirect`.

use chrono::{Timelike, Utc};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use warp::http::{HeaderMap, HeaderValue, Response, StatusCode};
use warp::hyper::Body;

use super::conditional::{self, format_http_date, ByteRange, Decision, Validators};
use super::error::ApiError;
use crate::app::AppError;
use crate::blobs::{BlobStore, DeliveryHint};
use crate::projections::read::AssetInfo;

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

/// How the bytes leave the process.
pub enum Delivery<'a> {
    /// Stream the file from the blob store.
    Direct,
    /// Let nginx send it (a local blob): `X-Accel-Redirect: <prefix><key>`.
    AccelRedirect(&'a str),
}

/// The full answer to a GET (or HEAD) of `asset`: preconditions (RFC 9110 §13.2.2 order),
/// then the range, then the bytes, from whichever backend holds them. Every decision is
/// made here, so every delivery answers alike; nginx is handed only requests it answers
/// the same way (see [`handover_agrees`]).
pub async fn respond(
    asset: &AssetInfo,
    request: &HeaderMap,
    is_head: bool,
    blobs: &BlobStore,
    delivery: Delivery<'_>,
    metrics: &crate::metrics::Metrics,
) -> Result<Response<Body>, ApiError> {
    let etag = etag(asset);
    let size = asset.asset_file_size.max(0) as u64;
    // HTTP dates have whole seconds: compare at that precision.
    let modified = asset.asset_created_at.with_nanosecond(0).unwrap_or(asset.asset_created_at);
    let mut builder = Response::builder()
        .header("etag", &etag)
        .header("cache-control", "private, no-cache")
        .header("last-modified", format_http_date(modified))
        .header("x-content-type-options", "nosniff");

    let representation = Validators { etag: &etag, last_modified: modified, size };
    let decision = conditional::evaluate(request, representation, is_head, Utc::now())
        .map_err(|e| ApiError::bad_request("invalid_header", e.to_string()))?;
    let range = match decision {
        Decision::PreconditionFailed => {
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                "the asset does not match the precondition",
            ))
        }
        Decision::NotModified => {
            return builder.status(StatusCode::NOT_MODIFIED).body(Body::empty()).map_err(ApiError::internal)
        }
        Decision::Send(ByteRange::Unsatisfiable) => {
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the asset has {size} bytes"),
            )
            .with_header("content-range", format!("bytes */{size}")))
        }
        Decision::Send(range) => range,
    };
    builder = builder
        .header(
            "content-type",
            HeaderValue::from_str(&asset.asset_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
        )
        .header("content-disposition", content_disposition(&asset.asset_original_filename));

    let location = asset.blob_location();
    let missing =
        |detail: String| ApiError::internal(format!("asset {} is available but its bytes {detail}", asset.asset_uuid));
    let backend = blobs.backend(location.backend).map_err(|error| ApiError::from(AppError::Storage(error)))?;
    let whole = matches!(range, ByteRange::Full);
    // A Range header that assetd ignored (invalid, or an If-Range that did not match)
    // is read by nginx by its own rules: such requests are not handed over.
    let handover = handover_agrees(request) && (request.get("range").is_none() || !whole);
    if !is_head && (handover || whole) {
        match backend.delivery_hint(&location.key).await.map_err(|error| ApiError::from(AppError::Storage(error)))? {
            // (A missing file is `Stream`: reading it below says what is wrong.)
            DeliveryHint::LocalFile(key) => {
                if let (Delivery::AccelRedirect(prefix), true) = (&delivery, handover) {
                    // nginx sends the bytes (the same single range, if any) with its
                    // own Accept-Ranges and Content-Range.
                    return builder
                        .header("x-accel-redirect", format!("{prefix}{key}"))
                        .body(Body::empty())
                        .map_err(ApiError::internal);
                }
            }
            // A presigned URL answers with the object store's own headers, so only a
            // plain whole download goes there.
            DeliveryHint::Redirect(url) if whole && request.get("range").is_none() => {
                return builder
                    .status(StatusCode::FOUND)
                    .header("location", url)
                    .body(Body::empty())
                    .map_err(ApiError::internal);
            }
            _ => {}
        }
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
        if backend.stat(&location.key).await.map_err(|error| ApiError::from(AppError::Storage(error)))?.is_none() {
            return Err(missing("are missing".into()));
        }
        return builder.body(Body::empty()).map_err(ApiError::internal);
    }
    let bytes = match backend.read(&location.key, start..start + length).await {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(missing(format!("cannot be read: {error}")))
        }
        Err(error) => return Err(AppError::Storage(error).into()),
    };
    // Counted as each chunk is handed to hyper: a client that goes away leaves at most
    // the chunks in flight counted but unsent.
    let metrics = metrics.clone();
    let stream = futures::TryStreamExt::inspect_ok(bytes, move |chunk| metrics.download_sent(chunk.len() as u64));
    builder.body(Body::wrap_stream(stream)).map_err(ApiError::internal)
}

/// Whether nginx, handed this request with X-Accel-Redirect, answers exactly as assetd
/// decided. nginx evaluates Range and If-Range itself, by its own rules, on the values
/// it received (which its proxying may have normalised before assetd saw them: trailing
/// whitespace, say). So nginx/assetd.conf passes those raw values along, bracketed so
/// that nothing trims them (`X-Assetd-Range: [<Range>]`, `X-Assetd-If-Range:
/// [<If-Range>]`), and a request is handed over only when they are what assetd read and
/// both parsers agree on them: no Range, or one plain single range (`bytes=N-M`,
/// `bytes=N-`, `bytes=-N`); If-Range only as an entity tag (nginx compares it byte for
/// byte with the ETag assetd sends, the strong comparison assetd makes). Requests with
/// If-Match or If-Unmodified-Since, already answered by assetd, are served here.
fn handover_agrees(request: &HeaderMap) -> bool {
    if ["if-match", "if-unmodified-since"].iter().any(|name| request.contains_key(*name)) {
        return false;
    }
    let Some(range) = single_value(request, "range") else { return false };
    let Some(if_range) = single_value(request, "if-range") else { return false };
    let as_nginx_has_it = |header: &str, value: &str| match single_value(request, header) {
        Some(raw) => raw.strip_prefix('[').and_then(|raw| raw.strip_suffix(']')) == Some(value),
        // An nginx that does not say what it holds: only requests without these.
        None => value.is_empty(),
    };
    (range.is_empty() || is_plain_single_range(range))
        && (if_range.is_empty() || (if_range.len() >= 2 && if_range.ends_with('"')))
        && as_nginx_has_it("x-assetd-range", range)
        && as_nginx_has_it("x-assetd-if-range", if_range)
}

/// The one value of header `name` ("" when absent); `None` when it is repeated or not
/// text.
fn single_value<'a>(request: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut values = request.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return None;
    }
    match first {
        Some(value) => value.to_str().ok(),
        None => Some(""),
    }
}

/// `bytes=N-M`, `bytes=N-` or `bytes=-N`: digits only (at most 18), no spaces.
fn is_plain_single_range(value: &str) -> bool {
    let digits = |text: &str| !text.is_empty() && text.len() <= 18 && text.bytes().all(|b| b.is_ascii_digit());
    let Some(spec) = value.strip_prefix("bytes=") else { return false };
    let Some((first, last)) = spec.split_once('-') else { return false };
    match (first.is_empty(), last.is_empty()) {
        (false, false) => digits(first) && digits(last),
        (false, true) => digits(first),
        (true, false) => digits(last),
        (true, true) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_single_ranges_go_to_nginx() {
        for plain in ["bytes=0-99", "bytes=5-", "bytes=-7", "bytes=000-1"] {
            assert!(is_plain_single_range(plain), "{plain}");
        }
        for other in [
            "bytes=0-1,3-4",
            "bytes= 0-1",
            "bytes=0 -1",
            "bytes=-",
            "bytes=a-1",
            "Bytes=0-1",
            "bytes=0-1234567890123456789",
            "items=0-1",
            "bytes=+1-2",
        ] {
            assert!(!is_plain_single_range(other), "{other}");
        }
    }

    #[test]
    fn content_disposition_keeps_non_ascii_names() {
        assert_eq!(
            content_disposition("résumé \"final\".pdf"),
            "attachment; filename=\"r_sum_ _final_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.pdf"
        );
    }
}
