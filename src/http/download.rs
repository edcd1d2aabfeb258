//! Sending an asset's bytes: conditional requests and single byte ranges (decided in
//! `conditional`: 304/412, 206/416), `Content-Disposition` with non-ASCII names, and
//! either streaming the file ourselves or handing it to nginx with `X-Accel-Redirect`.

use chrono::{Timelike, Utc};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use warp::http::{HeaderMap, HeaderValue, Response, StatusCode};
use warp::hyper::Body;

use super::conditional::{self, format_http_date, ByteRange, Decision, Validators};
use super::error::ApiError;
use crate::blobs::BlobStore;
use crate::projections::read::AssetInfo;

/// Bytes read from disk per chunk of a streamed download.
const READ_CHUNK: usize = 256 * 1024;

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
    // Counted as each chunk is handed to hyper: a client that goes away leaves at most
    // the chunks in flight counted but unsent.
    let metrics = metrics.clone();
    let stream = futures::TryStreamExt::inspect_ok(
        tokio_util::io::ReaderStream::with_capacity(file.take(length), READ_CHUNK),
        move |chunk| metrics.download_sent(chunk.len() as u64),
    );
    builder.body(Body::wrap_stream(stream)).map_err(ApiError::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_disposition_keeps_non_ascii_names() {
        assert_eq!(
            content_disposition("résumé \"final\".pdf"),
            "attachment; filename=\"r_sum_ _final_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.pdf"
        );
    }
}
