//! The rules of request fields as JSON Schema, for the OpenAPI document: what the server
//! enforces, stated exactly, so that client generators and fuzzers (scripts/schemathesis)
//! agree with it. Each is a named component the request types point to
//! (`#[schema(value_type = fields::AssetName)]`). The tests below hold every schema to
//! the code that checks the field: a value passes the schema exactly when the server
//! takes it.
//!
//! The domain's own schemas (`domain::names`, for `events/`) describe values as stored,
//! already normalised; these describe them as a client may send them (a directory
//! without its leading slash, a session name with blanks around it, …).

use std::borrow::Cow;

use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, ArrayBuilder, ObjectBuilder, Schema, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::{KnownFormat, Ref, RefOr};

use crate::domain::names::{
    InvalidValue, BIDI_CHARS, CONTROL_CHARS, MAX_DIRECTORY_CHARS, MAX_MEDIA_TYPE_BYTES, MAX_NAME_CHARS, MAX_TAGS,
    MAX_TAG_CHARS,
};
use crate::domain::session::{MAX_SESSION_MEMBERS, MAX_SESSION_NAME_CHARS};

/// What Rust's `char::is_whitespace` (and so `str::trim`) counts as blank, spelled out:
/// `\s` means something else in each regex engine (JSON Schema's ECMA-262 adds U+FEFF,
/// Python's adds U+001C–U+001F).
pub const WHITE_SPACE: &str = r"\u0009-\u000D\u0020\u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000";

/// Declares a named schema component `$name` for the marker type `$type`, with the
/// components its schema refers to.
macro_rules! field_schema {
    ($(#[$doc:meta])* $type:ident, $name:literal, $schema:expr $(, uses $($used:ident),+)?) => {
        $(#[$doc])*
        pub struct $type;
        impl utoipa::PartialSchema for $type {
            fn schema() -> RefOr<Schema> {
                $schema.into()
            }
        }
        impl utoipa::ToSchema for $type {
            fn name() -> Cow<'static, str> {
                $name.into()
            }
            fn schemas(_schemas: &mut Vec<(String, RefOr<Schema>)>) {
                $($(_schemas.push((
                    <$used as utoipa::ToSchema>::name().into_owned(),
                    <$used as utoipa::PartialSchema>::schema(),
                ));)+)?
            }
        }
    };
}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

/// `session_name`: 1 to 255 characters once trimmed, none of them a control character
/// (the blanks trimmed may be: a tab or a newline around the name is fine).
pub fn session_name_pattern() -> String {
    let (w, c) = (WHITE_SPACE, CONTROL_CHARS);
    let inner = MAX_SESSION_NAME_CHARS - 2;
    format!("^[{w}]*[^{w}{c}](?:[^{c}]{{0,{inner}}}[^{w}{c}])?[{w}]*$")
}

/// `asset_name`: at most 255 characters, not blank, no control characters or bidi
/// overrides, no `..` path segment (`/` and `\` both separate).
pub fn asset_name_pattern() -> String {
    let (w, c, b) = (WHITE_SPACE, CONTROL_CHARS, BIDI_CHARS);
    format!(r"^(?!(?:[\s\S]*[/\\])?\.\.(?:[/\\]|$))[^{c}{b}]*[^{w}{c}{b}][^{c}{b}]*$")
}

/// A file name: the display-name rules, one path segment, not `.` or `..`.
pub fn file_name_pattern() -> String {
    let (w, c, b) = (WHITE_SPACE, CONTROL_CHARS, BIDI_CHARS);
    format!(r"^(?!\.\.?$)[^{c}{b}/\\]*[^{w}{c}{b}/\\][^{c}{b}/\\]*$")
}

/// A virtual folder as sent: segments separated by any number of `/`, none blank, `.`
/// or `..`, no `\` or control characters; at most 1024 characters, and at most 1024 once
/// stored with a leading `/` (so 1024 characters without one, in stored form, are too many).
pub fn directory_pattern() -> String {
    let (w, c) = (WHITE_SPACE, CONTROL_CHARS);
    let max = MAX_DIRECTORY_CHARS;
    let segment = format!(r"(?!\.\.?(?:/|$))[^/\\{c}]*[^/\\{w}{c}][^/\\{c}]*");
    format!(r"^(?!(?=[\s\S]{{{max}}}$)[^/](?:[^/]|/(?!/|$))*$)/*(?:{segment}/+)*(?:{segment})?$")
}

/// A media type as a client gives it: RFC 6838 type and subtype names, then parameters
/// `;name=value` (one space allowed after `;`), each value a token or a quoted string of
/// printable ASCII. [`check_media_type`] enforces it.
pub fn media_type_pattern() -> String {
    let name = "[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}";
    let token = "[A-Za-z0-9!#$%&'*+.^_`|~-]+";
    format!(r#"^{name}/{name}(?:; ?{token}=(?:{token}|"[\u0020\u0021\u0023-\u007E]+"))*$"#)
}

/// Refuses an `asset_type` outside [`media_type_pattern`] (its grammar, by hand: the
/// regex crate is not a dependency), before `MediaType::parse` reads it.
pub fn check_media_type(value: &str) -> Result<(), InvalidValue> {
    let invalid = || {
        InvalidValue::new("asset_type", "must be a media type like 'application/zip' or 'text/plain; charset=utf-8'")
    };
    let restricted_name = |name: &str| {
        let mut chars = name.chars();
        name.len() <= 127
            && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || "!#$&^_.+-".contains(c))
    };
    let token = |text: &str| {
        !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+.^_`|~-".contains(c))
    };
    if value.chars().count() > MAX_MEDIA_TYPE_BYTES {
        return Err(invalid());
    }
    let (essence, mut rest) = match value.find(';') {
        Some(at) => value.split_at(at),
        None => (value, ""),
    };
    let Some((top, sub)) = essence.split_once('/') else { return Err(invalid()) };
    if !restricted_name(top) || !restricted_name(sub) {
        return Err(invalid());
    }
    while let Some(after) = rest.strip_prefix(';') {
        let after = after.strip_prefix(' ').unwrap_or(after);
        let (name, after) = after.split_once('=').ok_or_else(invalid)?;
        if !token(name) {
            return Err(invalid());
        }
        let (value_end, quoted) = match after.strip_prefix('"') {
            Some(quoted) => (quoted.find('"').map(|end| end + 2).ok_or_else(invalid)?, true),
            None => (after.find(';').unwrap_or(after.len()), false),
        };
        let parameter_value = &after[..value_end];
        let valid = if quoted {
            parameter_value.len() > 2 && parameter_value[1..value_end - 1].chars().all(|c| matches!(c, ' '..='~'))
        } else {
            token(parameter_value)
        };
        if !valid {
            return Err(invalid());
        }
        rest = &after[value_end..];
    }
    if rest.is_empty() {
        Ok(())
    } else {
        Err(invalid())
    }
}

/// The forms `Uuid::try_parse` (and so serde) reads: hyphenated, simple, braced, URN.
pub fn uuid_pattern() -> String {
    let hex = |n: usize| format!("[0-9A-Fa-f]{{{n}}}");
    let hyphenated = format!("{}-{}-{}-{}-{}", hex(8), hex(4), hex(4), hex(4), hex(12));
    format!(r"^(?:{hyphenated}|{}|\{{{hyphenated}\}}|[Uu][Rr][Nn]:[Uu][Uu][Ii][Dd]:{hyphenated})$", hex(32))
}

/// `asset_datetime`: `YYYY-MM-DDThh:mm:ss`, a fraction of 1 to 9 digits, then `Z`, an
/// offset `±hh:mm` or nothing (UTC). A real calendar day of the years 1 to 9999; on the
/// first and the last of them, no offset that would move the time out of that range.
/// Second 60 is a leap second (stored as the next second, so not at the very end of 9999).
/// [`check_datetime`] enforces it.
pub fn datetime_pattern() -> String {
    let (d28, d30, d31) = ("(?:0[1-9]|1[0-9]|2[0-8])", "(?:0[1-9]|[12][0-9]|30)", "(?:0[1-9]|[12][0-9]|3[01])");
    let leap_year = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)";
    let date = format!("(?:[0-9]{{4}}-(?:(?:0[13578]|1[02])-{d31}|(?:0[469]|11)-{d30}|02-{d28})|{leap_year}-02-29)");
    let time = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]{1,9})?";
    let offset = "(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?";
    let edges = r"(?!0000)(?!0001-01-01T[^+]*\+(?!00:00$))(?!9999-12-31T[^-]*-(?!00:00$))";
    let edges = format!(r"{edges}(?!9999-12-31T23:59:60(?:\.[0-9]*)?(?:Z|[+-]00:00)?$)");
    format!("^{edges}{date}T{time}{offset}$")
}

/// Refuses an `asset_datetime` outside [`datetime_pattern`] (its grammar by hand, the
/// calendar by chrono), before chrono, which reads more forms, parses it.
/// An `asset_datetime` as the API takes it: RFC 3339, or without an offset for UTC;
/// within the years the database keeps.
pub fn parse_asset_datetime(value: &str) -> Result<chrono::DateTime<chrono::Utc>, InvalidValue> {
    check_datetime(value)?;
    let parsed = chrono::DateTime::parse_from_rfc3339(value)
        .map(|d| d.with_timezone(&chrono::Utc))
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f").map(|n| n.and_utc()))
        .map_err(|_| InvalidValue::new("asset_datetime", "must be an RFC 3339 date-time"))?;
    crate::domain::names::check_storable_datetime("asset_datetime", parsed)
}

pub fn check_datetime(value: &str) -> Result<(), InvalidValue> {
    let invalid = || {
        InvalidValue::new(
            "asset_datetime",
            "must be a date-time like 2024-05-17T14:03:00Z (or +02:00, or no offset for UTC) in the years 1 to 9999",
        )
    };
    let bytes = value.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = bytes.get(range)?;
        digits.iter().all(u8::is_ascii_digit).then(|| digits.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(at, byte)| bytes.get(at) != Some(&byte)) {
        return Err(invalid());
    }
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) =
        (number(0..4), number(5..7), number(8..10), number(11..13), number(14..16), number(17..19))
    else {
        return Err(invalid());
    };
    let date = chrono::NaiveDate::from_ymd_opt(year as i32, month, day).filter(|_| year >= 1).ok_or_else(invalid)?;
    if hour > 23 || minute > 59 || second > 60 {
        return Err(invalid());
    }
    let mut rest = &value[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=9).contains(&digits) {
            return Err(invalid());
        }
        rest = &fraction[digits..];
    }
    let offset_minutes: i32 = match rest.as_bytes() {
        [] | [b'Z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (Some(hours), Some(minutes)) =
                (number(value.len() - 5..value.len() - 3), number(value.len() - 2..value.len()))
            else {
                return Err(invalid());
            };
            if hours > 23 || minutes > 59 {
                return Err(invalid());
            }
            let minutes = (hours * 60 + minutes) as i32;
            if *sign == b'-' {
                -minutes
            } else {
                minutes
            }
        }
        _ => return Err(invalid()),
    };
    let first = chrono::NaiveDate::from_ymd_opt(1, 1, 1);
    let last = chrono::NaiveDate::from_ymd_opt(9999, 12, 31);
    let last_second = Some(date) == last && (hour, minute, second) == (23, 59, 60);
    if (Some(date) == first && offset_minutes > 0) || (Some(date) == last && offset_minutes < 0) {
        return Err(invalid());
    }
    if last_second && offset_minutes == 0 {
        return Err(invalid()); // the next second is in the year 10000
    }
    Ok(())
}

/// `ListingCursor::encode`: microseconds since the epoch, `_`, the asset's uuid in hex;
/// empty is the first page.
pub const CURSOR_PATTERN: &str = "^(?:-?[0-9]{1,18}_[0-9A-Fa-f]{32})?$";

/// A job listing's `next_cursor` (a position in the global log); empty is the first page.
pub const JOB_CURSOR_PATTERN: &str = "^(?:[1-9][0-9]{0,17})?$";

/// An import's URL as the OpenAPI document promises it is accepted: http or https, a
/// host name (its last label starting with a letter) or an IPv4 address, a port (not 0), then
/// visible ASCII. A label has no `--` in its third and fourth places: `xn--` starts
/// an internationalised (punycode) label, which must decode, and the pattern cannot
/// promise that. (The server reads more, e.g. IPv6 literals, user info and valid
/// punycode.)
pub const IMPORT_URL_PATTERN: &str = concat!(
    r"^[Hh][Tt][Tt][Pp][Ss]?://",
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}",
    r"|(?:(?:[A-Za-z0-9-]{1,3}|[A-Za-z0-9-]{2}(?:[A-Za-z0-9][A-Za-z0-9-]|-[A-Za-z0-9])[A-Za-z0-9-]{0,59})\.)*",
    r"(?:[A-Za-z][A-Za-z0-9-]{0,2}|[A-Za-z][A-Za-z0-9-](?:[A-Za-z0-9][A-Za-z0-9-]|-[A-Za-z0-9])[A-Za-z0-9-]{0,59}))",
    r"(?::[1-9][0-9]{0,3})?(?:[/?#][!-~]*)?$"
);

/// No NUL anywhere: PostgreSQL's `jsonb` cannot hold it.
const NO_NUL: &str = r"^[^\u0000]*$";

field_schema!(
    /// A uuid as the server reads it. (Not named `Uuid`: utoipa takes any type of that
    /// name for the uuid crate's.)
    UuidText,
    "Uuid",
    string()
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
        .pattern(Some(uuid_pattern()))
        .description(Some("a uuid, hyphenated (the simple, braced and URN forms are read too)"))
);
field_schema!(
    /// `asset_datetime`, see [`datetime_pattern`].
    AssetDateTime,
    "AssetDateTime",
    string().pattern(Some(datetime_pattern())).description(Some(
        "an RFC 3339 date-time such as 2024-05-17T14:03:00.250Z or 2024-05-17T16:03:00+02:00 (up to 9 fraction \
         digits); without an offset it is UTC. Years 1 to 9999; on 0001-01-01 no positive offset, on 9999-12-31 no \
         negative one"
    ))
);
field_schema!(
    /// OpenTera's session id: a positive 64-bit integer.
    SessionId,
    "SessionId",
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(1))
        .maximum(Some(i64::MAX))
        .description(Some("OpenTera's session id"))
);
field_schema!(
    SessionName,
    "SessionName",
    string()
        .pattern(Some(session_name_pattern()))
        .description(Some("1 to 255 characters once trimmed, no control characters (blanks around are trimmed)"))
);
field_schema!(
    AssetName,
    "AssetName",
    string()
        .max_length(Some(MAX_NAME_CHARS))
        .pattern(Some(asset_name_pattern()))
        .description(Some("the asset's display name: not blank, no control characters, no '..' path segment"))
);
field_schema!(
    FileName,
    "FileName",
    string().max_length(Some(MAX_NAME_CHARS)).pattern(Some(file_name_pattern())).description(Some(
        "a file name: one path segment (no '/' or '\\'), not blank, '.' or '..', no control characters"
    ))
);
field_schema!(
    Directory,
    "Directory",
    string().max_length(Some(MAX_DIRECTORY_CHARS)).pattern(Some(directory_pattern())).description(Some(
        "a virtual folder such as '/videos/day 1' (a leading '/' is added, repeated and trailing ones dropped); \
             no blank, '.' or '..' segment; '' or '/' is the root"
    ))
);
field_schema!(
    MediaType,
    "MediaType",
    string()
        .max_length(Some(MAX_MEDIA_TYPE_BYTES))
        .pattern(Some(media_type_pattern()))
        .description(Some("a media type such as 'application/zip' or 'text/plain; charset=utf-8'"))
);
field_schema!(
    Tags,
    "Tags",
    ArrayBuilder::new()
        .items(
            string()
                .min_length(Some(1))
                .max_length(Some(MAX_TAG_CHARS))
                .pattern(Some(format!("^[^{CONTROL_CHARS}]*$")))
        )
        .max_items(Some(MAX_TAGS))
        .description(Some("free-form labels: at most 64, each 1 to 128 characters without control characters"))
);
field_schema!(
    /// Any JSON but the NUL character, in strings and keys alike.
    MetadataValue,
    "MetadataValue",
    AnyOfBuilder::new()
        .item(string().pattern(Some(NO_NUL)))
        .item(ObjectBuilder::new().schema_type(SchemaType::Array(vec![Type::Number, Type::Boolean, Type::Null])))
        .item(ArrayBuilder::new().items(Ref::from_schema_name("MetadataValue")))
        .item(
            ObjectBuilder::new()
                .property_names(Some(string().pattern(Some(NO_NUL))))
                .additional_properties(Some(AdditionalProperties::RefOr(Ref::from_schema_name("MetadataValue").into())))
        )
        .description(Some("any JSON value without the NUL character (\\u0000) in a string or key"))
);

field_schema!(
    /// `metadata`: an object of anything JSON but NUL characters.
    Metadata,
    "Metadata",
    ObjectBuilder::new()
        .property_names(Some(string().pattern(Some(NO_NUL))))
        .additional_properties(Some(AdditionalProperties::RefOr(Ref::from_schema_name("MetadataValue").into())))
        .description(Some("free-form JSON object; no NUL character (\\u0000) in any string or key")),
    uses MetadataValue
);
field_schema!(
    ListingCursor,
    "ListingCursor",
    string()
        .pattern(Some(CURSOR_PATTERN))
        .description(Some("the `next_cursor` of the previous page; empty for the first page"))
);
field_schema!(
    /// The `Idempotency-Key` header: printable ASCII, no blank at either end.
    IdempotencyKey,
    "IdempotencyKey",
    string()
        .min_length(Some(1))
        .max_length(Some(255))
        .pattern(Some("^[!-~](?:[ -~]*[!-~])?$"))
        .description(Some("the same key and body give the same job (409 for another body)"))
);
field_schema!(
    /// See [`JOB_CURSOR_PATTERN`].
    JobCursor,
    "JobCursor",
    string()
        .pattern(Some(JOB_CURSOR_PATTERN))
        .description(Some("the `next_cursor` of the previous page; empty for the first page"))
);
field_schema!(
    /// See [`IMPORT_URL_PATTERN`].
    ImportUrl,
    "ImportUrl",
    string()
        .max_length(Some(crate::app::jobs::MAX_URL_BYTES))
        .pattern(Some(IMPORT_URL_PATTERN))
        .description(Some("http or https; only public addresses unless allow-listed (ASSETD_IMPORT_ALLOWLIST)"))
);
field_schema!(
    /// A page size.
    PageSize,
    "PageSize",
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(1))
        .maximum(Some(super::sessions::MAX_PAGE))
        .description(Some("page size, 1 to 1000 (100 when absent)"))
);
field_schema!(
    /// How long a signed URL is to be valid, in seconds.
    ExpiresIn,
    "ExpiresIn",
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(1))
        .maximum(Some(i64::MAX))
        .description(Some("seconds, 1 or more; cut to the configured maximum (ASSETD_SIGNED_URL_MAX_SECONDS)"))
);
field_schema!(
    /// A member list of a session.
    Members,
    "Members",
    ArrayBuilder::new()
        .items(Ref::from_schema_name("Uuid"))
        .max_items(Some(MAX_SESSION_MEMBERS))
        .description(Some("uuids; at most 10,000 in a session's three lists together")),
    uses UuidText
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::names;
    use proptest::prelude::*;
    use utoipa::PartialSchema;

    /// A validator for the component `T` (references resolved against the components
    /// here), compiled once.
    fn validator<T: utoipa::ToSchema>() -> &'static jsonschema::Validator {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        static VALIDATORS: OnceLock<Mutex<HashMap<String, &'static jsonschema::Validator>>> = OnceLock::new();
        let mut validators = VALIDATORS.get_or_init(Default::default).lock().unwrap();
        validators.entry(T::name().into_owned()).or_insert_with(|| {
            let mut schema = serde_json::to_value(T::schema()).unwrap();
            schema["$defs"] = serde_json::json!({"MetadataValue": MetadataValue::schema()});
            let text = serde_json::to_string(&schema).unwrap().replace("#/components/schemas/", "#/$defs/");
            Box::leak(Box::new(
                jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).expect("a valid schema"),
            ))
        })
    }

    /// Every string schema against its rule, for one input.
    fn all_agree(input: &str) -> Result<(), TestCaseError> {
        agrees(validator::<SessionName>(), input, session_name_accepted(input))?;
        agrees(validator::<AssetName>(), input, names::AssetName::parse(input).is_ok())?;
        agrees(validator::<FileName>(), input, names::FileName::parse(input).is_ok())?;
        agrees(validator::<Directory>(), input, names::Directory::parse(input).is_ok())?;
        let media_type = check_media_type(input).and_then(|()| names::MediaType::parse(input));
        agrees(validator::<MediaType>(), input, media_type.is_ok())?;
        // What the grammar lets through, `MediaType::parse` takes as it is.
        prop_assert!(check_media_type(input).is_err() || media_type.is_ok(), "{:?}", input);
        let cursor = crate::projections::read::ListingCursor::decode(input);
        agrees(validator::<ListingCursor>(), input, input.is_empty() || cursor.is_some())?;
        Ok(())
    }

    #[test]
    fn white_space_is_what_rust_trims() {
        let class = format!("^[{WHITE_SPACE}]$");
        let matcher = jsonschema::validator_for(&serde_json::json!({"pattern": class})).unwrap();
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            assert_eq!(matcher.is_valid(&serde_json::json!(c.to_string())), c.is_whitespace(), "{c:?}");
        }
    }

    /// Short strings of the characters the rules are about, and long ones near the bounds.
    fn tricky_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[-a./\\\\ \\t\\x00\\n\\x1c\\x7f\\u{85}\\u{a0}\\u{feff}\\u{202e}\\u{2067}\\u{3000}é;=+\"]{0,10}",
            "[ \\t]{0,2}[a./ ]{1,4}[ \\n]{0,2}",
            "[a/]{250,260}",
            "/?[a/]{1018,1030}",
            "[a ]{250,260}",
            "[a-z+.%*-]{1,8}/[a-z+.-]{0,8}(;|; |;  )?[a-z]{0,4}=?[a-zA-Z0-9\" é]{0,6}",
            "[a-z]{1,3}/[a-z;= ]{240,260}",
            "-?[0-9]{1,20}_[0-9a-fA-F-]{30,36}",
        ]
    }

    fn agrees(schema: &jsonschema::Validator, input: &str, accepted: bool) -> Result<(), TestCaseError> {
        let valid = schema.is_valid(&serde_json::json!(input));
        prop_assert_eq!(valid, accepted, "schema says {}, the server {} for {:?}", valid, accepted, input);
        Ok(())
    }

    fn session_name_accepted(name: &str) -> bool {
        let upsert = crate::domain::session::UpsertSession {
            id_session: names::SessionId::new(1).unwrap(),
            session_name: name.to_owned(),
            session_uuid: None,
            id_creator_uuid: None,
            session_users: vec![],
            session_participants: vec![],
            session_devices: vec![],
        };
        crate::domain::session::Session::default().handle_upsert(upsert, uuid::Uuid::nil()).is_ok()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn field_schemas_accept_exactly_what_the_server_takes(input in tricky_text()) {
            all_agree(&input)?;
        }

        #[test]
        fn tag_and_metadata_schemas_match_their_rules(tags in prop::collection::vec("[a\\x00\\n é]{0,3}|a{127,129}", 0..66), key in "[a\\x00]{0,2}", text in "[a\\x00]{0,2}") {
            prop_assert_eq!(validator::<Tags>().is_valid(&serde_json::json!(tags)), names::Tags::parse(tags.clone()).is_ok());
            for metadata in [
                serde_json::json!({&key: 1}),
                serde_json::json!({"a": [1, {&key: [null, &text]}]}),
                serde_json::json!({"a": {"b": &text}, &key: true}),
            ] {
                prop_assert_eq!(
                    validator::<Metadata>().is_valid(&metadata),
                    names::check_storable_json("metadata", &metadata).is_ok(),
                    "{}", metadata
                );
            }
        }
    }

    /// The bounds, exactly: the longest names, directories that reach 1024 characters only
    /// once stored with their leading slash, blanks that are trimmed or not.
    #[test]
    fn field_schemas_agree_at_the_edges() {
        let a = |n: usize| "a".repeat(n);
        for input in [
            a(255),
            a(256),
            format!(" {} ", a(255)),
            format!("\t{}\u{85}", a(255)),
            format!("\u{3000}{}\n", a(256)),
            a(1024),
            format!("/{}", a(1023)),
            format!("{}/", a(1023)),
            format!("{}//{}", a(511), a(511)),
            format!("{}/{}", a(511), a(512)),
            format!("/{}", a(1024)),
            format!("{}/", a(1024)),
            "..".into(),
            "a/../b".into(),
            "a/.../b".into(),
            "a\\..".into(),
            ". .".into(),
            "/ /a".into(),
            format!("text/{}", a(250)),
            format!("text/{}", a(251)),
            format!("{}/{}", a(127), a(127)),
            format!("{}/{}", a(128), a(10)),
            "text/plain; a=\"b c\"".into(),
            "0_00000000000000000000000000000000".into(),
            "-999999999999999999_0123456789abcdefABCDEF0123456789".into(),
        ] {
            all_agree(&input).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    fn datetime_text() -> impl Strategy<Value = String> {
        let year = prop_oneof![
            Just("0000".to_owned()),
            Just("0001".to_owned()),
            Just("9999".to_owned()),
            "1900|2000|2023|2024|2100",
            "[0-9]{4}"
        ];
        let two = |max: u32| (0..=max).prop_map(|n| format!("{n:02}"));
        let date = (year, two(13), two(32)).prop_map(|(y, m, d)| format!("{y}-{m}-{d}"));
        let date = prop_oneof![date, Just("0001-01-01".to_owned()), Just("9999-12-31".to_owned())];
        let time = (two(24), two(60), two(61), "(\\.[0-9]{0,10})?").prop_map(|(h, m, s, f)| format!("{h}:{m}:{s}{f}"));
        let offset =
            prop_oneof![Just(String::new()), "[Zz]", "[+-−](0[0-9]|2[3-4]):(00|59|60)", "[+-][0-9]{1,2}:?[0-9]{0,2}"];
        (date, "[Tt ]|T", time, offset, "|x| ").prop_map(|(d, t, time, o, tail)| format!("{d}{t}{time}{o}{tail}"))
    }

    fn uuid_text() -> impl Strategy<Value = String> {
        let hyphenated = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{11,13}";
        prop_oneof![
            hyphenated.prop_map(|h| h),
            "[0-9a-fA-G]{31,33}",
            (r"\{?", hyphenated, r"\}?").prop_map(|(a, h, b)| format!("{a}{h}{b}")),
            ("(urn|URN|Urn|urm):(uuid|Uuid):?", hyphenated).prop_map(|(p, h)| format!("{p}{h}")),
            "[-0-9a-f{}]{0,40}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn datetime_and_uuid_schemas_accept_exactly_what_the_server_takes(datetime in datetime_text(), uuid in uuid_text()) {
            agrees(validator::<AssetDateTime>(), &datetime, super::super::upload::parse_datetime(&datetime).is_ok())?;
            agrees(validator::<UuidText>(), &uuid, uuid::Uuid::try_parse(&uuid).is_ok())?;
            agrees(validator::<UuidText>(), &datetime, uuid::Uuid::try_parse(&datetime).is_ok())?;
        }
    }

    #[test]
    fn datetimes_at_the_edges() {
        for (datetime, ok) in [
            ("2024-02-29T00:00:00Z", true),
            ("2023-02-29T00:00:00Z", false),
            ("2000-02-29T23:59:59.123456789+23:59", true),
            ("1900-02-29T00:00:00Z", false),
            ("0001-01-01T00:00:00-05:00", true),
            ("0001-01-01T10:00:00+05:00", false),
            ("0001-01-01T00:00:00+00:00", true),
            ("9999-12-31T23:59:59.999999999Z", true),
            ("9999-12-31T00:00:00-00:01", false),
            ("9999-12-31T23:59:60Z", false),
            ("9999-12-31T23:59:60.5", false),
            ("9999-12-31T23:59:60+00:01", true),
            ("2016-12-31T23:59:60Z", true),
            ("2016-12-31T23:59:61Z", false),
            ("0001-01-01T00:00:60", true),
            ("2024-01-01T00:00:00", true),
            ("2024-01-01t00:00:00Z", false),
            ("2024-01-01T00:00:00z", false),
            ("2024-01-01T00:00:00.Z", false),
            ("2024-01-01T00:00:00.1234567890Z", false),
        ] {
            assert_eq!(super::super::upload::parse_datetime(datetime).is_ok(), ok, "{datetime}");
            all_agree_datetime(datetime);
        }
    }

    fn all_agree_datetime(datetime: &str) {
        let accepted = super::super::upload::parse_datetime(datetime).is_ok();
        assert_eq!(validator::<AssetDateTime>().is_valid(&serde_json::json!(datetime)), accepted, "{datetime}");
    }

    #[test]
    fn session_ids_and_page_sizes_are_bounded() {
        let ids = validator::<SessionId>();
        for (id, ok) in [
            (serde_json::json!(1), true),
            (serde_json::json!(i64::MAX), true),
            (serde_json::json!(0), false),
            (serde_json::json!(-1), false),
        ] {
            assert_eq!(ids.is_valid(&id), ok, "{id}");
        }
        assert!(!ids.is_valid(&serde_json::json!(9223372036854775808u64)));
        let sizes = validator::<PageSize>();
        assert!(sizes.is_valid(&serde_json::json!(1)) && sizes.is_valid(&serde_json::json!(1000)));
        assert!(!sizes.is_valid(&serde_json::json!(0)) && !sizes.is_valid(&serde_json::json!(1001)));
    }

    #[test]
    fn cursors_past_the_storable_years_are_clamped_into_them() {
        use crate::projections::read::ListingCursor as Cursor;
        let uuid = uuid::Uuid::new_v4();
        for micros in
            [i64::MIN / 1000 + 1, -62_135_596_800_000_001, 0, 253_402_300_800_000_000, 999_999_999_999_999_999]
        {
            let decoded = Cursor::decode(&format!("{micros}_{}", uuid.simple())).expect("a cursor");
            assert!(names::check_storable_datetime("cursor", decoded.created_at).is_ok(), "{micros}");
            assert_eq!(decoded.asset_uuid, uuid);
        }
        let issued = Cursor { created_at: chrono::Utc::now(), asset_uuid: uuid };
        let again = Cursor::decode(&issued.encode()).unwrap();
        assert_eq!(
            (again.created_at.timestamp_micros(), again.asset_uuid),
            (issued.created_at.timestamp_micros(), uuid)
        );
        for bad in [
            "1_",
            "_00000000000000000000000000000000",
            "+1_00000000000000000000000000000000",
            "1_0000000000000000000000000000000g",
        ] {
            assert!(Cursor::decode(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn media_types_clients_send_are_taken() {
        for ok in [
            "application/zip",
            "text/plain; charset=utf-8",
            "text/plain;charset=UTF-8",
            "application/vnd.api+json",
            "multipart/mixed; boundary=\"a b\"",
        ] {
            assert!(check_media_type(ok).is_ok(), "{ok}");
        }
        for bad in [
            "text/",
            "/plain",
            "text/plain;",
            "text/plain; a=",
            "text/plain ;a=b",
            "*/*",
            "text/plain; a=\"\"",
            "text/plain; a=\"é\"",
        ] {
            assert!(check_media_type(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn import_urls_with_punycode_labels_are_read_by_the_server_not_promised_by_the_pattern() {
        let user = crate::domain::principal::Principal {
            kind: crate::domain::principal::PrincipalKind::User,
            uuid: uuid::Uuid::nil(),
            name: "u".into(),
            superadmin: false,
        };
        let import = |url: &str| crate::app::jobs::ImportBody {
            id_session: 1,
            url: url.into(),
            asset_name: "a".into(),
            asset_type: None,
            sha256: None,
            directory: None,
            tags: None,
            metadata: None,
            id_user: None,
            id_participant: None,
            id_device: None,
            id_service: None,
        };
        for (url, promised, accepted) in [
            ("http://xN--", false, false),
            ("http://xn--x.example/f", false, false),
            ("https://xn--bcher-kva.example/f", false, true),
            ("https://ab-c.example-host.org:8443/f?x=1", true, true),
            ("http://a--b.example/f", true, true),
        ] {
            assert_eq!(validator::<ImportUrl>().is_valid(&serde_json::json!(url)), promised, "{url}");
            assert_eq!(import(url).validate(&user).is_ok(), accepted, "{url}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever the document says an import URL may be, the server takes (schemathesis
        /// sends exactly such URLs and expects them accepted).
        #[test]
        fn import_urls_the_schema_allows_are_accepted(
            url in proptest::string::string_regex(&IMPORT_URL_PATTERN[1..IMPORT_URL_PATTERN.len() - 1]).unwrap()
        ) {
            prop_assume!(url.len() <= crate::app::jobs::MAX_URL_BYTES);
            prop_assert!(validator::<ImportUrl>().is_valid(&serde_json::json!(url)), "{}", url);
            let body = crate::app::jobs::ImportBody {
                id_session: 1, url: url.clone(), asset_name: "a".into(), asset_type: None, sha256: None,
                directory: None, tags: None, metadata: None, id_user: None, id_participant: None, id_device: None,
                id_service: None,
            };
            let user = crate::domain::principal::Principal {
                kind: crate::domain::principal::PrincipalKind::User, uuid: uuid::Uuid::nil(), name: "u".into(),
                superadmin: false,
            };
            prop_assert!(body.validate(&user).is_ok(), "{}: {:?}", url, crate::app::jobs::ImportBody {
                id_session: 1, url: url.clone(), asset_name: "a".into(), asset_type: None, sha256: None,
                directory: None, tags: None, metadata: None, id_user: None, id_participant: None, id_device: None,
                id_service: None,
            }.validate(&user).err());
        }
    }
}
