//! Authentication: JWTs that identify principals, and the short-lived asset access
//! tokens assetd signs itself (OpenTera's `access_token`).
//!
//! Principal tokens are HS256 with `ASSETD_JWT_SECRET`. Asset access tokens are HS256
//! with a key derived from the same secret for that one purpose, so neither kind of token
//! can ever be accepted as the other.

use chrono::Utc;
use jsonwebtoken::{decode, encode, errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::principal::{Principal, PrincipalKind};

/// Seconds of clock skew tolerated on `exp`.
const LEEWAY_SECONDS: u64 = 5;

/// The claims of a principal token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: Uuid,
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub superadmin: bool,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
}

/// The claims of an asset access token: which assets it opens, until when.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AssetAccessClaims {
    asset_uuids: Vec<Uuid>,
    exp: i64,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is malformed, unsigned or wrongly signed")]
    Invalid,
}

#[derive(Clone)]
pub struct Authenticator {
    principal_encoding: EncodingKey,
    principal_decoding: DecodingKey,
    asset_encoding: EncodingKey,
    asset_decoding: DecodingKey,
    validation: Validation,
}

impl Authenticator {
    pub fn new(jwt_secret: &str) -> Self {
        let asset_key =
            Sha256::new().chain_update(b"assetd asset access token\0").chain_update(jwt_secret.as_bytes()).finalize();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECONDS;
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_nbf = true;
        Self {
            principal_encoding: EncodingKey::from_secret(jwt_secret.as_bytes()),
            principal_decoding: DecodingKey::from_secret(jwt_secret.as_bytes()),
            asset_encoding: EncodingKey::from_secret(&asset_key),
            asset_decoding: DecodingKey::from_secret(&asset_key),
            validation,
        }
    }

    /// Verifies a principal token (signature, algorithm, expiry, claims).
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let claims = decode::<Claims>(token, &self.principal_decoding, &self.validation)
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?
            .claims;
        let kind = PrincipalKind::parse(&claims.kind).ok_or(TokenError::Invalid)?;
        Ok(Principal { kind, uuid: claims.sub, name: claims.name, superadmin: claims.superadmin })
    }

    /// Mints a principal token (for `assetd token`, tests and development).
    pub fn mint(&self, principal: &Principal, lifetime_seconds: i64) -> String {
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: principal.uuid,
            kind: principal.kind.as_str().to_owned(),
            name: principal.name.clone(),
            superadmin: principal.superadmin,
            exp: now + lifetime_seconds,
            iat: Some(now),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.principal_encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// Signs an access token for these assets, valid `lifetime_seconds`.
    pub fn mint_asset_token(&self, asset_uuids: &[Uuid], lifetime_seconds: i64) -> String {
        let claims =
            AssetAccessClaims { asset_uuids: asset_uuids.to_vec(), exp: Utc::now().timestamp() + lifetime_seconds };
        encode(&Header::new(Algorithm::HS256), &claims, &self.asset_encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// Whether `token` is a valid access token naming `asset_uuid`.
    pub fn asset_token_grants(&self, token: &str, asset_uuid: Uuid) -> Result<bool, TokenError> {
        let claims = decode::<AssetAccessClaims>(token, &self.asset_decoding, &self.validation)
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?
            .claims;
        Ok(claims.asset_uuids.contains(&asset_uuid))
    }
}

/// Takes the token out of `Authorization: OpenTera <token>` or `Bearer <token>`.
pub fn token_from_authorization(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (["opentera", "bearer"].contains(&scheme.to_ascii_lowercase().as_str()) && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn principal(kind: PrincipalKind) -> Principal {
        Principal { kind, uuid: Uuid::new_v4(), name: "n".into(), superadmin: false }
    }

    #[test]
    fn minted_tokens_verify_and_carry_the_principal() {
        let auth = Authenticator::new("secret");
        let p = principal(PrincipalKind::Device);
        assert_eq!(auth.verify(&auth.mint(&p, 60)).unwrap(), p);
    }

    #[test]
    fn expired_wrongly_signed_unsigned_and_malformed_tokens_are_refused() {
        let auth = Authenticator::new("secret");
        let p = principal(PrincipalKind::User);
        assert_eq!(auth.verify(&auth.mint(&p, -60)), Err(TokenError::Expired));
        assert_eq!(Authenticator::new("other").verify(&auth.mint(&p, 60)), Err(TokenError::Invalid));
        assert_eq!(auth.verify("not.a.token"), Err(TokenError::Invalid));
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let claims = format!(r#"{{"sub":"{}","kind":"service","exp":{}}}"#, p.uuid, Utc::now().timestamp() + 60);
        let unsigned = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&claims));
        assert_eq!(auth.verify(&unsigned), Err(TokenError::Invalid));
    }

    #[test]
    fn asset_tokens_and_principal_tokens_are_not_interchangeable() {
        let auth = Authenticator::new("secret");
        let asset = Uuid::new_v4();
        let asset_token = auth.mint_asset_token(&[asset], 60);
        assert_eq!(auth.asset_token_grants(&asset_token, asset), Ok(true));
        assert_eq!(auth.asset_token_grants(&asset_token, Uuid::new_v4()), Ok(false));
        assert_eq!(auth.verify(&asset_token), Err(TokenError::Invalid));
        let principal_token = auth.mint(&principal(PrincipalKind::Service), 60);
        assert_eq!(auth.asset_token_grants(&principal_token, asset), Err(TokenError::Invalid));
        assert_eq!(auth.asset_token_grants(&auth.mint_asset_token(&[asset], -60), asset), Err(TokenError::Expired));
    }

    #[test]
    fn both_authorization_schemes_are_accepted() {
        assert_eq!(token_from_authorization("OpenTera abc"), Some("abc"));
        assert_eq!(token_from_authorization("Bearer abc"), Some("abc"));
        assert_eq!(token_from_authorization("bearer  abc "), Some("abc"));
        assert_eq!(token_from_authorization("Basic abc"), None);
        assert_eq!(token_from_authorization("Bearer"), None);
    }
}
