//! Authentication: JWTs that identify principals, and the short-lived asset access
//! tokens assetd signs itself (OpenTera's `access_token`).
//!
//! Principal tokens are HS256 with `ASSETD_JWT_SECRET`. Asset access tokens are HS256
//! with a key derived from the same secret for that one purpose, so neither kind of token
//! can ever be accepted as the other.
//!
//! Claims are trusted no further than they must be: only users can be superadmins; a
//! principal token may not live longer than its kind's configured maximum ([`TokenLimits`],
//! counted from now, whatever `iat` says); a header with `crit` extensions is refused
//! (we understand none, RFC 7515 §4.1.11), and so is an `nbf` or `iat` that is not a
//! number. An asset access token names who asked for it, and grants what that requester
//! could do when the token is used (see `App::asset_access`).

use chrono::Utc;
use jsonwebtoken::{decode, encode, errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::principal::{Principal, PrincipalKind};

mod signed_url;
pub use signed_url::{SignatureError, UrlSigner};

/// Seconds of clock skew tolerated on `exp`.
const LEEWAY_SECONDS: u64 = 5;

/// How long a principal token of each kind may live at most, in seconds from the moment
/// it is used: a token whose `exp` lies further ahead is refused.
#[derive(clap::Args, Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenLimits {
    /// Longest lifetime of a user token, in seconds.
    #[arg(long, env = "ASSETD_MAX_USER_TOKEN_LIFETIME", default_value_t = DAY)]
    pub max_user_token_lifetime: i64,
    /// Longest lifetime of a participant token, in seconds.
    #[arg(long, env = "ASSETD_MAX_PARTICIPANT_TOKEN_LIFETIME", default_value_t = DAY)]
    pub max_participant_token_lifetime: i64,
    /// Longest lifetime of a device token, in seconds.
    #[arg(long, env = "ASSETD_MAX_DEVICE_TOKEN_LIFETIME", default_value_t = DAY)]
    pub max_device_token_lifetime: i64,
    /// Longest lifetime of a service token, in seconds.
    #[arg(long, env = "ASSETD_MAX_SERVICE_TOKEN_LIFETIME", default_value_t = DAY)]
    pub max_service_token_lifetime: i64,
}

const DAY: i64 = 24 * 3600;

impl Default for TokenLimits {
    fn default() -> Self {
        Self {
            max_user_token_lifetime: DAY,
            max_participant_token_lifetime: DAY,
            max_device_token_lifetime: DAY,
            max_service_token_lifetime: DAY,
        }
    }
}

impl TokenLimits {
    pub fn max_lifetime(&self, kind: PrincipalKind) -> i64 {
        match kind {
            PrincipalKind::User => self.max_user_token_lifetime,
            PrincipalKind::Participant => self.max_participant_token_lifetime,
            PrincipalKind::Device => self.max_device_token_lifetime,
            PrincipalKind::Service => self.max_service_token_lifetime,
        }
    }
}

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
    /// Checked by the validation; declared so that one that is not a number is refused
    /// rather than ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
}

/// The claims of an asset access token: which assets it opens, for whom, until when.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AssetAccessClaims {
    asset_uuids: Vec<Uuid>,
    /// Who asked for it (OpenTera's claim name), and as what kind of principal.
    requester_uuid: Uuid,
    requester_kind: PrincipalKind,
    /// Whether the requester was a superadmin when it asked.
    #[serde(default)]
    requester_superadmin: bool,
    exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
}

/// What a valid asset access token says: the assets it names and who asked for it.
/// What it grants is decided where it is used, against the requester's access then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetGrant {
    pub asset_uuids: Vec<Uuid>,
    pub requester: Principal,
    /// When the token expires (Unix seconds): what it opens, it opens until then only.
    pub expires_at: i64,
}

impl AssetGrant {
    pub fn names(&self, asset_uuid: Uuid) -> bool {
        self.asset_uuids.contains(&asset_uuid)
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is malformed, unsigned or wrongly signed")]
    Invalid,
    #[error("the token lives longer than the {0} s this kind of token may")]
    LivesTooLong(i64),
}

/// Refuses a token whose header lists `crit` extensions: we implement none, and RFC 7515
/// §4.1.11 says a recipient that does not understand them must reject the token.
fn refuse_critical_extensions(token: &str) -> Result<(), TokenError> {
    use base64::Engine;
    let header = token.split('.').next().ok_or(TokenError::Invalid)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).map_err(|_| TokenError::Invalid)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Invalid)?;
    if header.contains_key("crit") {
        return Err(TokenError::Invalid);
    }
    Ok(())
}

#[derive(Clone)]
pub struct Authenticator {
    principal_encoding: EncodingKey,
    principal_decoding: DecodingKey,
    asset_encoding: EncodingKey,
    asset_decoding: DecodingKey,
    validation: Validation,
    limits: TokenLimits,
}

impl Authenticator {
    /// With the default [`TokenLimits`].
    pub fn new(jwt_secret: &str) -> Self {
        Self::with_limits(jwt_secret, TokenLimits::default())
    }

    pub fn with_limits(jwt_secret: &str, limits: TokenLimits) -> Self {
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
            limits,
        }
    }

    /// Decodes and validates a token of either kind: signature, algorithm, expiry,
    /// `nbf`, no `crit` extensions, and claims of the right types.
    fn decode<C: serde::de::DeserializeOwned>(&self, token: &str, key: &DecodingKey) -> Result<C, TokenError> {
        refuse_critical_extensions(token)?;
        decode::<C>(token, key, &self.validation).map(|data| data.claims).map_err(|error| match error.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            _ => TokenError::Invalid,
        })
    }

    /// Verifies a principal token (signature, algorithm, expiry, claims).
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let claims: Claims = self.decode(token, &self.principal_decoding)?;
        let kind = PrincipalKind::parse(&claims.kind).ok_or(TokenError::Invalid)?;
        let lifetime_left = claims.exp.saturating_sub(Utc::now().timestamp());
        if lifetime_left > self.limits.max_lifetime(kind).saturating_add(LEEWAY_SECONDS as i64) {
            return Err(TokenError::LivesTooLong(self.limits.max_lifetime(kind)));
        }
        // Only users can be superadmins (OpenTera's `user_superadmin`).
        let superadmin = claims.superadmin && kind == PrincipalKind::User;
        Ok(Principal { kind, uuid: claims.sub, name: claims.name, superadmin })
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
            nbf: None,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.principal_encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// Signs an access token for these assets, asked for by `requester`, valid
    /// `lifetime_seconds`.
    pub fn mint_asset_token(&self, asset_uuids: &[Uuid], requester: &Principal, lifetime_seconds: i64) -> String {
        let claims = AssetAccessClaims {
            asset_uuids: asset_uuids.to_vec(),
            requester_uuid: requester.uuid,
            requester_kind: requester.kind,
            requester_superadmin: requester.superadmin,
            exp: Utc::now().timestamp() + lifetime_seconds,
            nbf: None,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.asset_encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// What a valid asset access token says.
    pub fn asset_grant(&self, token: &str) -> Result<AssetGrant, TokenError> {
        let claims: AssetAccessClaims = self.decode(token, &self.asset_decoding)?;
        let requester = Principal {
            kind: claims.requester_kind,
            uuid: claims.requester_uuid,
            name: String::new(),
            superadmin: claims.requester_superadmin && claims.requester_kind == PrincipalKind::User,
        };
        Ok(AssetGrant { asset_uuids: claims.asset_uuids, requester, expires_at: claims.exp })
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
        let requester = principal(PrincipalKind::Participant);
        let grant = auth.asset_grant(&auth.mint_asset_token(&[asset], &requester, 60)).unwrap();
        assert!(grant.names(asset) && !grant.names(Uuid::new_v4()));
        assert_eq!((grant.requester.kind, grant.requester.uuid), (requester.kind, requester.uuid));
        assert_eq!(auth.verify(&auth.mint_asset_token(&[asset], &requester, 60)), Err(TokenError::Invalid));
        let principal_token = auth.mint(&principal(PrincipalKind::Service), 60);
        assert_eq!(auth.asset_grant(&principal_token), Err(TokenError::Invalid));
        assert_eq!(auth.asset_grant(&auth.mint_asset_token(&[asset], &requester, -60)), Err(TokenError::Expired));
    }

    /// A token signed with the test secret from raw header and claims JSON (headers
    /// jsonwebtoken's own `Header` could not carry).
    fn signed(header: &str, claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let input = format!("{}.{}", b64(header), b64(claims));
        let key = EncodingKey::from_secret(b"secret");
        format!("{input}.{}", jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap())
    }

    #[test]
    fn claims_are_trusted_no_further_than_they_must_be() {
        let auth = Authenticator::new("secret");
        let now = Utc::now().timestamp();
        let claims = |kind: &str, extra: &str, exp: i64| {
            format!(r#"{{"sub":"{}","kind":"{kind}","exp":{exp}{extra}}}"#, Uuid::new_v4())
        };
        let header = r#"{"alg":"HS256","typ":"JWT"}"#;
        // The hand-made signature is right: a plain token verifies.
        assert!(auth.verify(&signed(header, &claims("user", "", now + 60))).is_ok());
        // Only users can be superadmins.
        for kind in ["participant", "device", "service"] {
            let p = auth.verify(&signed(header, &claims(kind, r#","superadmin":true"#, now + 60))).unwrap();
            assert!(!p.superadmin, "{kind}");
        }
        assert!(auth.verify(&signed(header, &claims("user", r#","superadmin":true"#, now + 60))).unwrap().superadmin);
        // Lifetimes are capped per kind (24 h by default), counted from now.
        let far = now + 2 * DAY;
        assert_eq!(auth.verify(&signed(header, &claims("user", "", far))), Err(TokenError::LivesTooLong(DAY)));
        assert!(auth.verify(&signed(header, &claims("user", "", now + DAY))).is_ok());
        let longer = TokenLimits { max_service_token_lifetime: 30 * DAY, ..TokenLimits::default() };
        let configured = Authenticator::with_limits("secret", longer);
        assert!(configured.verify(&signed(header, &claims("service", "", far))).is_ok());
        assert!(configured.verify(&signed(header, &claims("user", "", far))).is_err());
        // Unknown critical header parameters are refused (RFC 7515 §4.1.11).
        let critical = r#"{"alg":"HS256","typ":"JWT","crit":["exp-ext"],"exp-ext":1}"#;
        assert_eq!(auth.verify(&signed(critical, &claims("user", "", now + 60))), Err(TokenError::Invalid));
        // nbf and iat must be numbers; a future nbf is refused.
        for extra in [r#","nbf":"yesterday""#, r#","iat":"now""#, r#","nbf":true"#, r#","nbf":1.5e9"#] {
            assert_eq!(
                auth.verify(&signed(header, &claims("user", extra, now + 60))),
                Err(TokenError::Invalid),
                "{extra}"
            );
        }
        assert!(auth.verify(&signed(header, &claims("user", &format!(r#","nbf":{}"#, now - 10), now + 60))).is_ok());
        assert!(auth.verify(&signed(header, &claims("user", &format!(r#","nbf":{}"#, now + 600), now + 900))).is_err());
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
