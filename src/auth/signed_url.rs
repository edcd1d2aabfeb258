//! Signed URLs (DESIGN.md "Security model"): a URL that carries its own permission, for
//! clients that cannot send an Authorization header (browsers following a link, CDNs,
//! small devices). The signature is HMAC-SHA256 with `ASSETD_URL_SIGNING_KEY` over the
//! method, the path and the expiry, so that changing any of them (another asset, a later
//! expiry, a PUT with a GET's signature) invalidates it. The key is not the JWT secret:
//! either can be rotated without the other. During a rotation, URLs signed with the
//! previous key (`ASSETD_URL_SIGNING_KEY_PREVIOUS`) still verify until they expire.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a signed URL was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Missing, malformed, or not made with one of our keys for this method, path and
    /// expiry.
    #[error("the URL's signature is missing or invalid")]
    Invalid,
    /// Well signed, but its time is over.
    #[error("the signed URL has expired")]
    Expired,
}

/// Signs and verifies URLs with the current key (and, for verification only, the
/// previous one).
#[derive(Clone)]
pub struct UrlSigner {
    current: Vec<u8>,
    previous: Option<Vec<u8>>,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlSigner").field("previous", &self.previous.is_some()).finish_non_exhaustive()
    }
}

impl UrlSigner {
    pub fn new(current: String, previous: Option<String>) -> Self {
        Self { current: current.into_bytes(), previous: previous.filter(|key| !key.is_empty()).map(String::into_bytes) }
    }

    fn mac(key: &[u8], method: &str, path: &str, expires: i64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(method.as_bytes());
        mac.update(b"\n");
        mac.update(path.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// The signature (lower-case hex) of `method` on `path` until `expires` (Unix seconds).
    pub fn sign(&self, method: &str, path: &str, expires: i64) -> String {
        hex::encode(Self::mac(&self.current, method, path, expires).finalize().into_bytes())
    }

    /// The query string of a signed URL: `expires=<E>&signature=<S>`.
    pub fn query(&self, method: &str, path: &str, expires: i64) -> String {
        format!("expires={expires}&signature={}", self.sign(method, path, expires))
    }

    /// Checks `signature` for `method` on `path` until `expires`, as given in the URL,
    /// at `now` (Unix seconds). The comparison takes constant time; the expiry is looked
    /// at only once the signature is known to be ours, so a forged URL never learns more
    /// than "invalid".
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        expires: Option<&str>,
        signature: Option<&str>,
        now: i64,
    ) -> Result<(), SignatureError> {
        let expires_text = expires.ok_or(SignatureError::Invalid)?;
        // Digits only, as we write it: "+5" or "05" would parse but was never signed.
        let expires: i64 = match expires_text.parse::<i64>() {
            Ok(value) if value.to_string() == expires_text => value,
            _ => return Err(SignatureError::Invalid),
        };
        let signature = signature.and_then(|s| hex::decode(s).ok()).ok_or(SignatureError::Invalid)?;
        let keys = std::iter::once(&self.current).chain(self.previous.as_ref());
        let signed_by_us =
            keys.into_iter().any(|key| Self::mac(key, method, path, expires).verify_slice(&signature).is_ok());
        if !signed_by_us {
            return Err(SignatureError::Invalid);
        }
        if expires <= now {
            return Err(SignatureError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/file/api/signed/assets/a1b2c3d4-0000-4000-8000-000000000000";

    #[test]
    fn a_signature_holds_only_for_its_method_path_and_expiry_until_then() {
        let signer = UrlSigner::new("key".into(), None);
        let signature = signer.sign("GET", PATH, 1000);
        let verify = |method: &str, path: &str, expires: &str, signature: &str, now: i64| {
            signer.verify(method, path, Some(expires), Some(signature), now)
        };
        assert_eq!(verify("GET", PATH, "1000", &signature, 999), Ok(()));
        assert_eq!(verify("GET", PATH, "1000", &signature, 1000), Err(SignatureError::Expired));
        assert_eq!(verify("PUT", PATH, "1000", &signature, 999), Err(SignatureError::Invalid));
        assert_eq!(verify("GET", &format!("{PATH}x"), "1000", &signature, 999), Err(SignatureError::Invalid));
        assert_eq!(verify("GET", PATH, "1001", &signature, 999), Err(SignatureError::Invalid));
        for odd in ["+1000", "01000", "1000 ", ""] {
            assert_eq!(verify("GET", PATH, odd, &signature, 999), Err(SignatureError::Invalid), "{odd:?}");
        }
        let mut flipped = signature.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            verify("GET", PATH, "1000", std::str::from_utf8(&flipped).unwrap(), 999),
            Err(SignatureError::Invalid)
        );
        assert_eq!(verify("GET", PATH, "1000", &signature[..10], 999), Err(SignatureError::Invalid));
        assert_eq!(signer.verify("GET", PATH, None, Some(&signature), 999), Err(SignatureError::Invalid));
        assert_eq!(signer.verify("GET", PATH, Some("1000"), None, 999), Err(SignatureError::Invalid));
        // An expired URL that is not ours is "invalid": expiry is told only to the signer's URLs.
        assert_eq!(verify("GET", PATH, "10", &"0".repeat(64), 999), Err(SignatureError::Invalid));
    }

    #[test]
    fn the_previous_key_still_verifies_and_only_the_current_one_signs() {
        let old = UrlSigner::new("old".into(), None);
        let rotated = UrlSigner::new("new".into(), Some("old".into()));
        let by_old = old.sign("GET", PATH, 1000);
        assert_eq!(rotated.verify("GET", PATH, Some("1000"), Some(&by_old), 1), Ok(()));
        assert_ne!(rotated.sign("GET", PATH, 1000), by_old);
        let unrelated = UrlSigner::new("other".into(), None).sign("GET", PATH, 1000);
        assert_eq!(rotated.verify("GET", PATH, Some("1000"), Some(&unrelated), 1), Err(SignatureError::Invalid));
        assert_eq!(UrlSigner::new("new".into(), Some(String::new())).previous, None);
    }
}
