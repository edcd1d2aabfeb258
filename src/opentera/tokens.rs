//! OpenTera's tokens, verified as its `ServiceAccessManager` does: where the token is
//! taken from, which key verifies which kind, the claims of each kind, static tokens,
//! and asset access tokens (`asset_uuids`, `requester_uuid`).
//!
//! Every token is HS256 under a key TeraServer keeps in Redis ([`TokenKeys`]). A token
//! names no kind: the kind is the key that verifies it. `exp` is checked when present
//! (static tokens have none), as PyJWT does.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use uuid::Uuid;
use warp::http::HeaderMap;

use crate::domain::principal::{Principal, PrincipalKind};

/// The keys, as read from Redis (a key TeraServer has not written yet is absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenKeys {
    pub user: Option<Vec<u8>>,
    pub participant: Option<Vec<u8>>,
    pub participant_static: Option<Vec<u8>>,
    pub device: Option<Vec<u8>>,
    pub device_static: Option<Vec<u8>>,
    pub service: Option<Vec<u8>>,
}

/// Which tokens a route takes: FTS's `allow_static_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRule {
    /// Dynamic tokens only (downloads, deletes, infos by GET). A device's token passes
    /// anyway: TeraServer signs device tokens with one key for both.
    DynamicOnly,
    /// Static tokens too (the POSTs: uploads, infos, archives).
    StaticAllowed,
}

/// Where a request's token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FoundToken {
    /// An `Authorization` header that is not `<scheme> <credentials>`: refused outright.
    MalformedHeader,
    /// `Authorization: OpenTera <token>`: may be a service token.
    Header(String),
    /// The `token` argument or the `OpenTera` cookie: never a service token.
    Argument(String),
    None,
}

/// Finds the token as FTS does: the `Authorization` header (scheme `OpenTera`), else the
/// `token` query argument, else the `OpenTera` cookie.
pub fn find_token(headers: &HeaderMap, query_token: Option<&str>) -> FoundToken {
    if let Some(header) = headers.get("authorization") {
        let Ok(text) = header.to_str() else { return FoundToken::MalformedHeader };
        let mut parts = text.trim_start().splitn(2, char::is_whitespace);
        let (Some(scheme), Some(token)) = (parts.next(), parts.next()) else { return FoundToken::MalformedHeader };
        let token = token.trim();
        if token.is_empty() {
            return FoundToken::MalformedHeader;
        }
        if scheme == "OpenTera" {
            return FoundToken::Header(token.to_owned());
        }
    }
    if let Some(token) = query_token {
        return FoundToken::Argument(token.to_owned());
    }
    let cookie = headers
        .get_all("cookie")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == "OpenTera")
        .map(|(_, value)| value.trim_matches('"').to_owned());
    cookie.map_or(FoundToken::None, FoundToken::Argument)
}

/// An authenticated OpenTera caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    /// TeraServer's integer id of the caller (`id_user`, `id_participant`, `id_device`);
    /// none for services (their token carries no id).
    pub id: Option<i64>,
    /// The raw token, for the calls to TeraServer made on the caller's behalf.
    pub token: String,
}

/// A token that verified, before the revocation check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub caller: Caller,
    /// The Redis set of revoked tokens to look this one up in (users and dynamic
    /// participant tokens only, as OpenTera does).
    pub revocation_set: Option<&'static str>,
}

pub const USER_REVOKED: &str = "user_disabled_tokens";
pub const PARTICIPANT_REVOKED: &str = "participant_disabled_tokens";

fn validation() -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    // PyJWT: `exp` and `nbf` checked when present, nothing required, no leeway.
    validation.required_spec_claims.clear();
    validation.leeway = 0;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation
}

fn claims(token: &str, key: Option<&[u8]>) -> Option<Map<String, Value>> {
    let key = key?;
    let claims = decode::<Map<String, Value>>(token, &DecodingKey::from_secret(key), &validation())
        .ok()
        .map(|data| data.claims)?;
    // PyJWT refuses a time claim that is not a number; the validation above would skip it.
    let times_are_numbers = ["exp", "nbf", "iat"].iter().all(|name| claims.get(*name).is_none_or(Value::is_number));
    times_are_numbers.then_some(claims)
}

fn uuid_claim(claims: &Map<String, Value>, name: &str) -> Option<Uuid> {
    claims.get(name)?.as_str()?.parse().ok()
}

fn id_claim(claims: &Map<String, Value>, name: &str) -> Option<i64> {
    claims.get(name)?.as_i64()
}

fn caller(kind: PrincipalKind, claims: &Map<String, Value>, token: &str) -> Option<Caller> {
    let (uuid_name, id_name) = match kind {
        PrincipalKind::User => ("user_uuid", Some("id_user")),
        PrincipalKind::Participant => ("participant_uuid", Some("id_participant")),
        PrincipalKind::Device => ("device_uuid", Some("id_device")),
        PrincipalKind::Service => ("service_uuid", None),
    };
    let uuid = uuid_claim(claims, uuid_name)?;
    let id = match id_name {
        Some(name) => Some(id_claim(claims, name)?),
        None => None,
    };
    let text = |name: &str| claims.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
    let name = match kind {
        PrincipalKind::User => text("user_fullname"),
        PrincipalKind::Participant => text("participant_name"),
        PrincipalKind::Device => text("device_name"),
        PrincipalKind::Service => text("service_key"),
    };
    let superadmin =
        kind == PrincipalKind::User && claims.get("user_superadmin").and_then(Value::as_bool).unwrap_or(false);
    Some(Caller { principal: Principal { kind, uuid, name, superadmin }, id, token: token.to_owned() })
}

/// Verifies a found token in FTS's order: a header token as a service's first; then as
/// a user's, a device's (dynamic, then static where allowed), a participant's (dynamic,
/// then static where allowed). `revoked` says whether a token is in a Redis set of
/// revoked tokens; a revoked user token fails, and a revoked dynamic participant token
/// fails without trying the static key (as in OpenTera).
pub async fn verify<F, Fut>(keys: &TokenKeys, found: &FoundToken, rule: TokenRule, revoked: F) -> Option<Caller>
where
    F: Fn(&'static str, String) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let token = match found {
        FoundToken::MalformedHeader | FoundToken::None => return None,
        FoundToken::Header(token) => {
            if let Some(claims) = claims(token, keys.service.as_deref()) {
                // A token the service key verifies is a service's, or nothing.
                return caller(PrincipalKind::Service, &claims, token);
            }
            token
        }
        FoundToken::Argument(token) => token,
    };
    if let Some(found) = claims(token, keys.user.as_deref()).and_then(|c| caller(PrincipalKind::User, &c, token)) {
        if !revoked(USER_REVOKED, token.clone()).await {
            return Some(found);
        }
    }
    let device = claims(token, keys.device.as_deref()).or_else(|| match rule {
        TokenRule::StaticAllowed => claims(token, keys.device_static.as_deref()),
        TokenRule::DynamicOnly => None,
    });
    if let Some(found) = device.and_then(|c| caller(PrincipalKind::Device, &c, token)) {
        return Some(found);
    }
    if let Some(claims) = claims(token, keys.participant.as_deref()) {
        if revoked(PARTICIPANT_REVOKED, token.clone()).await {
            return None;
        }
        return caller(PrincipalKind::Participant, &claims, token);
    }
    if rule == TokenRule::StaticAllowed {
        if let Some(claims) = claims(token, keys.participant_static.as_deref()) {
            return caller(PrincipalKind::Participant, &claims, token);
        }
    }
    None
}

/// Does an asset access token open `asset_uuid` to `requester`? Signed with the service
/// key; `requester_uuid` must be the caller; `asset_uuids` a list naming the asset, or
/// (TeraServer's per-asset tokens) one string that is the asset's uuid.
pub fn access_token_grants(keys: &TokenKeys, token: &str, requester: Uuid, asset_uuid: &str) -> bool {
    accessible_assets(keys, token, requester).iter().any(|granted| granted == asset_uuid)
}

/// The assets an access token opens to `requester` (empty when it opens none).
pub fn accessible_assets(keys: &TokenKeys, token: &str, requester: Uuid) -> Vec<String> {
    let Some(claims) = claims(token, keys.service.as_deref()) else { return vec![] };
    if uuid_claim(&claims, "requester_uuid") != Some(requester) {
        return vec![];
    }
    match claims.get("asset_uuids") {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        Some(Value::String(one)) => vec![one.clone()],
        _ => vec![],
    }
}

/// An access token in OpenTera's form, valid `lifetime_seconds`.
pub fn mint_access_token(service_key: &[u8], asset_uuids: &[Uuid], requester: Uuid, lifetime_seconds: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({
        "iat": now,
        "exp": now + lifetime_seconds,
        "iss": "TeraServer",
        "asset_uuids": asset_uuids.iter().map(Uuid::to_string).collect::<Vec<_>>(),
        "requester_uuid": requester.to_string(),
    });
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(service_key))
        .expect("HS256 signing of plain claims cannot fail")
}

/// The token assetd uses towards TeraServer as the FileTransferService: a service token
/// with its uuid, as TeraServer's own `TeraService.get_token` makes them.
pub fn mint_service_token(service_key: &[u8], service_uuid: Uuid, lifetime_seconds: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({
        "iat": now,
        "exp": now + lifetime_seconds,
        "jti": Uuid::new_v4().to_string(),
        "iss": "TeraServer",
        "service_uuid": service_uuid.to_string(),
    });
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(service_key))
        .expect("HS256 signing of plain claims cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(key: &str, claims: Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(key.as_bytes())).unwrap()
    }

    fn keys() -> TokenKeys {
        let k = |s: &str| Some(s.as_bytes().to_vec());
        TokenKeys {
            user: k("user"),
            participant: k("participant"),
            participant_static: k("participant-static"),
            device: k("device"),
            device_static: k("device"),
            service: k("service"),
        }
    }

    async fn check(found: FoundToken, rule: TokenRule) -> Option<Caller> {
        verify(&keys(), &found, rule, |_, _| async { false }).await
    }

    #[tokio::test]
    async fn each_key_gives_its_kind_and_static_participants_only_where_allowed() {
        let uuid = Uuid::new_v4().to_string();
        let exp = chrono::Utc::now().timestamp() + 60;
        let user =
            sign("user", serde_json::json!({"user_uuid": uuid, "id_user": 3, "user_superadmin": true, "exp": exp}));
        let found = check(FoundToken::Header(user.clone()), TokenRule::DynamicOnly).await.unwrap();
        assert_eq!((found.principal.kind, found.id, found.principal.superadmin), (PrincipalKind::User, Some(3), true));
        let service = sign("service", serde_json::json!({"service_uuid": uuid}));
        assert_eq!(
            check(FoundToken::Header(service.clone()), TokenRule::DynamicOnly).await.unwrap().principal.kind,
            PrincipalKind::Service
        );
        // Service tokens count only in the header.
        assert!(check(FoundToken::Argument(service), TokenRule::StaticAllowed).await.is_none());
        let device = sign("device", serde_json::json!({"device_uuid": uuid, "id_device": 1}));
        assert!(check(FoundToken::Argument(device), TokenRule::DynamicOnly).await.is_some());
        let participant =
            sign("participant-static", serde_json::json!({"participant_uuid": uuid, "id_participant": 1}));
        assert!(check(FoundToken::Header(participant.clone()), TokenRule::DynamicOnly).await.is_none());
        assert!(check(FoundToken::Header(participant), TokenRule::StaticAllowed).await.is_some());
        let expired = sign("user", serde_json::json!({"user_uuid": uuid, "id_user": 3, "exp": exp - 120}));
        assert!(check(FoundToken::Header(expired), TokenRule::DynamicOnly).await.is_none());
        for odd in [serde_json::json!((exp - 120).to_string()), serde_json::json!("garbage"), Value::Null] {
            let token = sign("user", serde_json::json!({"user_uuid": uuid, "id_user": 3, "exp": odd}));
            assert!(check(FoundToken::Header(token), TokenRule::DynamicOnly).await.is_none(), "exp {odd}");
        }
        let revoked = verify(&keys(), &FoundToken::Header(user), TokenRule::DynamicOnly, |_, _| async { true }).await;
        assert!(revoked.is_none());
    }

    #[test]
    fn the_token_is_found_where_fts_looks_for_it() {
        let mut headers = HeaderMap::new();
        assert_eq!(find_token(&headers, Some("q")), FoundToken::Argument("q".into()));
        headers.insert("cookie", "a=b; OpenTera=c".parse().unwrap());
        assert_eq!(find_token(&headers, None), FoundToken::Argument("c".into()));
        headers.insert("authorization", "OpenTera  t ".parse().unwrap());
        assert_eq!(find_token(&headers, Some("q")), FoundToken::Header("t".into()));
        headers.insert("authorization", "Bearer t".parse().unwrap());
        assert_eq!(find_token(&headers, Some("q")), FoundToken::Argument("q".into()));
        headers.insert("authorization", "OpenTera".parse().unwrap());
        assert_eq!(find_token(&headers, Some("q")), FoundToken::MalformedHeader);
    }

    #[test]
    fn access_tokens_name_assets_as_a_list_or_one_string_for_their_requester_only() {
        let (asset, requester) = (Uuid::new_v4(), Uuid::new_v4());
        let keys = keys();
        let listed = mint_access_token(b"service", &[asset], requester, 60);
        assert!(access_token_grants(&keys, &listed, requester, &asset.to_string()));
        assert!(!access_token_grants(&keys, &listed, Uuid::new_v4(), &asset.to_string()));
        assert!(!access_token_grants(&keys, &listed, requester, "1111111"));
        let one = sign(
            "service",
            serde_json::json!({"asset_uuids": asset.to_string(), "requester_uuid": requester.to_string()}),
        );
        assert!(access_token_grants(&keys, &one, requester, &asset.to_string()));
        assert!(!access_token_grants(&keys, &sign("user", serde_json::json!({})), requester, &asset.to_string()));
    }
}
