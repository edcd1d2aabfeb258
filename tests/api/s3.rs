//! A bucket of its own for each test of the S3 blob backend, in the moto server that
//! scripts/test starts (`ASSETD_TEST_S3_ENDPOINT`), and a look inside it that does not go
//! through assetd: the keys stored and the multipart uploads left open.
//!
//! Requests are not signed (moto checks no signature) but carry a dummy `Authorization`
//! header: moto takes a request without one as anonymous and refuses it on an existing
//! object (403, empty body), as S3 does for a private object.

use reqwest::Url;
use uuid::Uuid;

/// Not a signature; moto reads only the region in it.
const AUTHORIZATION: &str =
    "AWS4-HMAC-SHA256 Credential=test/20250101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";

/// The S3 endpoint of the tests, e.g. `http://127.0.0.1:41234`; None outside scripts/test.
#[allow(dead_code)]
pub fn s3_endpoint() -> Option<String> {
    std::env::var("ASSETD_TEST_S3_ENDPOINT").ok().filter(|endpoint| !endpoint.is_empty())
}

/// A fresh bucket: tests run in parallel against one server and never see each other's
/// objects. Not removed afterwards; moto's buckets go when scripts/test stops it.
#[allow(dead_code)]
pub struct TestBucket {
    pub endpoint: String,
    pub name: String,
}

#[allow(dead_code)]
impl TestBucket {
    pub async fn create() -> TestBucket {
        let endpoint = s3_endpoint()
            .expect("ASSETD_TEST_S3_ENDPOINT is not set: run scripts/test, or start moto_server and export it");
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        // Lowercase, 44 characters: a valid bucket name (at most 63).
        let name = format!("assetd-test-{}", Uuid::new_v4().simple());
        let url = format!("{endpoint}/{name}");
        let response = reqwest::Client::new()
            .put(&url)
            .header(reqwest::header::AUTHORIZATION, AUTHORIZATION)
            .send()
            .await
            .unwrap_or_else(|error| panic!("PUT {url} (creating the test bucket): {error}"));
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "PUT {url} (creating the test bucket): {status}\n{body}");
        TestBucket { endpoint, name }
    }

    /// Every key in the bucket, in S3's order (ListObjectsV2, all pages).
    pub async fn object_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = self.url();
            url.query_pairs_mut().append_pair("list-type", "2");
            if let Some(token) = &token {
                url.query_pairs_mut().append_pair("continuation-token", token);
            }
            let xml = self.get(url).await;
            keys.extend(elements(&xml, "Key").into_iter().map(unescape));
            if !is_truncated(&xml) {
                return keys;
            }
            token = Some(first(&xml, "NextContinuationToken"));
        }
    }

    /// The multipart uploads begun and neither completed nor aborted, as (key, upload id):
    /// what an interrupted upload must not leave behind (ListMultipartUploads, all pages).
    pub async fn pending_multipart_uploads(&self) -> Vec<(String, String)> {
        let mut uploads = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut url = self.url();
            url.set_query(Some("uploads"));
            if let Some((key, upload_id)) = &markers {
                url.query_pairs_mut().append_pair("key-marker", key).append_pair("upload-id-marker", upload_id);
            }
            let xml = self.get(url).await;
            for upload in elements(&xml, "Upload") {
                uploads.push((first(upload, "Key"), first(upload, "UploadId")));
            }
            if !is_truncated(&xml) {
                return uploads;
            }
            markers = Some((first(&xml, "NextKeyMarker"), first(&xml, "NextUploadIdMarker")));
        }
    }

    /// The environment a spawned `assetd serve` needs to keep its blobs under `prefix` in
    /// this bucket (object_store reads the `AWS_*` variables).
    pub fn env(&self, prefix: &str) -> Vec<(String, String)> {
        [
            ("ASSETD_BLOBS", format!("s3://{}/{prefix}", self.name)),
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", "test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }

    /// Deletes every object, then the bucket itself (a deployment's bucket gone).
    pub async fn delete_everything(&self) {
        let client = reqwest::Client::new();
        for key in self.object_keys().await {
            let url = format!("{}/{}/{key}", self.endpoint, self.name);
            let response = client.delete(&url).header(reqwest::header::AUTHORIZATION, AUTHORIZATION).send().await;
            assert!(response.unwrap().status().is_success(), "DELETE {url}");
        }
        let response =
            client.delete(self.url()).header(reqwest::header::AUTHORIZATION, AUTHORIZATION).send().await.unwrap();
        assert!(response.status().is_success(), "DELETE the bucket: {}", response.status());
    }

    fn url(&self) -> Url {
        let url = format!("{}/{}", self.endpoint, self.name);
        Url::parse(&url).unwrap_or_else(|error| panic!("bad S3 endpoint in {url}: {error}"))
    }

    /// GET on the bucket; the XML answer, or a panic that shows S3's error.
    async fn get(&self, url: Url) -> String {
        let response = reqwest::Client::new()
            .get(url.clone())
            .header(reqwest::header::AUTHORIZATION, AUTHORIZATION)
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {url}: {error}"));
        let status = response.status();
        let body = response.text().await.unwrap_or_else(|error| panic!("GET {url}: reading the body: {error}"));
        assert!(status.is_success(), "GET {url}: {status}\n{body}");
        body
    }
}

/// The raw text inside every `<tag>…</tag>` of `xml`, in order. S3's answers are simple
/// enough for this: no attributes on these elements and no CDATA.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        rest = &rest[start + open.len()..];
        let end = rest.find(&close).unwrap_or_else(|| panic!("no {close} in S3's answer:\n{xml}"));
        found.push(&rest[..end]);
        rest = &rest[end + close.len()..];
    }
    found
}

/// The unescaped text of the first `<tag>`, which must be there.
fn first(xml: &str, tag: &str) -> String {
    let text = elements(xml, tag).into_iter().next().unwrap_or_else(|| panic!("no <{tag}> in S3's answer:\n{xml}"));
    unescape(text)
}

fn is_truncated(xml: &str) -> bool {
    elements(xml, "IsTruncated").first().copied() == Some("true")
}

/// XML text to the string it stands for: the five named entities and `&#…;` references
/// (S3 writes a key's control characters as those).
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let end = rest[at..].find(';').map(|end| at + end).unwrap_or_else(|| panic!("unterminated entity in {text:?}"));
        let entity = &rest[at + 1..end];
        let character = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => match entity.strip_prefix("#x").or_else(|| entity.strip_prefix("#X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok().and_then(char::from_u32),
                None => {
                    entity.strip_prefix('#').and_then(|decimal| decimal.parse::<u32>().ok()).and_then(char::from_u32)
                }
            },
        };
        out.push(character.unwrap_or_else(|| panic!("unknown entity &{entity}; in {text:?}")));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}
