//! Value types that can only be built valid ("parse, don't validate"). Filenames and
//! asset names are data shown to people and put in `Content-Disposition`, never paths:
//! stored bytes are addressed by uuid. Still, we refuse names that would be dangerous or
//! useless anywhere a client might save them.

use serde::{Deserialize, Serialize};

/// Longest file or asset name we accept, in characters (most file systems allow 255 bytes).
pub const MAX_NAME_CHARS: usize = 255;
/// Longest virtual directory path, in characters.
pub const MAX_DIRECTORY_CHARS: usize = 1024;
pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_CHARS: usize = 128;
pub const MAX_MEDIA_TYPE_BYTES: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidValue {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidValue {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self { field, reason: reason.into() }
    }
}

/// OpenTera's integer session id; strictly positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct SessionId(i64);

impl SessionId {
    pub fn new(id: i64) -> Result<Self, InvalidValue> {
        if id > 0 {
            Ok(Self(id))
        } else {
            Err(InvalidValue::new("id_session", "must be a positive integer"))
        }
    }
    pub fn get(self) -> i64 {
        self.0
    }
    pub fn stream(self) -> String {
        format!("session-{}", self.0)
    }
}
impl TryFrom<i64> for SessionId {
    type Error = InvalidValue;
    fn try_from(id: i64) -> Result<Self, InvalidValue> {
        Self::new(id)
    }
}
impl From<SessionId> for i64 {
    fn from(id: SessionId) -> i64 {
        id.0
    }
}
impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Characters no text value may hold: C0/C1 controls and U+FEFF (an invisible
/// "zero-width no-break space" that JSON Schema's `\s` counts as blank and `trim` does
/// not: refused, so that every schema agrees with the code).
pub fn is_forbidden_char(c: char) -> bool {
    c.is_control() || c == '\u{feff}'
}

/// Checks shared by every human-visible name: not blank, bounded, no control characters
/// (NUL, newlines, escapes) and no invisible bidi overrides that disguise extensions.
fn check_display_name(field: &'static str, value: &str) -> Result<(), InvalidValue> {
    if value.trim().is_empty() {
        return Err(InvalidValue::new(field, "must not be empty"));
    }
    if value.chars().count() > MAX_NAME_CHARS {
        return Err(InvalidValue::new(field, format!("must be at most {MAX_NAME_CHARS} characters")));
    }
    if value.chars().any(|c| {
        is_forbidden_char(c) || ('\u{202a}'..='\u{202e}').contains(&c) || ('\u{2066}'..='\u{2069}').contains(&c)
    }) {
        return Err(InvalidValue::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// A file's original name as uploaded (`asset_original_filename`): one path segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FileName(String);

impl FileName {
    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        Self::parse_field("filename", value)
    }
    pub fn parse_field(field: &'static str, value: &str) -> Result<Self, InvalidValue> {
        check_display_name(field, value)?;
        if value.contains('/') || value.contains('\\') {
            return Err(InvalidValue::new(field, "must be a file name, not a path (no '/' or '\\')"));
        }
        if value == "." || value == ".." {
            return Err(InvalidValue::new(field, "must not be '.' or '..'"));
        }
        Ok(Self(value.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for FileName {
    type Error = InvalidValue;
    fn try_from(value: String) -> Result<Self, InvalidValue> {
        Self::parse(&value)
    }
}
impl From<FileName> for String {
    fn from(name: FileName) -> String {
        name.0
    }
}

/// The asset's display name (`asset_name`); free text within the display-name rules,
/// except that path traversal sequences are refused so no client can be tricked into
/// using it as a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AssetName(String);

impl AssetName {
    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        check_display_name("asset_name", value)?;
        if value.split(['/', '\\']).any(|segment| segment == "..") {
            return Err(InvalidValue::new("asset_name", "must not contain '..' path segments"));
        }
        Ok(Self(value.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for AssetName {
    type Error = InvalidValue;
    fn try_from(value: String) -> Result<Self, InvalidValue> {
        Self::parse(&value)
    }
}
impl From<AssetName> for String {
    fn from(name: AssetName) -> String {
        name.0
    }
}

/// A virtual folder inside a session: `/`, `/videos`, `/videos/day 1`. Normalised to a
/// leading slash and no trailing one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Directory(String);

impl Directory {
    pub fn root() -> Self {
        Self("/".to_owned())
    }
    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        const FIELD: &str = "directory";
        if value.chars().count() > MAX_DIRECTORY_CHARS {
            return Err(InvalidValue::new(FIELD, format!("must be at most {MAX_DIRECTORY_CHARS} characters")));
        }
        if value.chars().any(is_forbidden_char) || value.contains('\\') {
            return Err(InvalidValue::new(FIELD, "must not contain control characters or '\\'"));
        }
        let segments: Vec<&str> = value.split('/').filter(|s| !s.is_empty()).collect();
        for segment in &segments {
            if *segment == "." || *segment == ".." {
                return Err(InvalidValue::new(FIELD, "must not contain '.' or '..' segments"));
            }
            if segment.trim().is_empty() {
                return Err(InvalidValue::new(FIELD, "must not contain blank segments"));
            }
        }
        // Bounded as stored (a leading slash may be added), so a stored one parses again.
        let normalised = format!("/{}", segments.join("/"));
        if normalised.chars().count() > MAX_DIRECTORY_CHARS {
            return Err(InvalidValue::new(FIELD, format!("must be at most {MAX_DIRECTORY_CHARS} characters")));
        }
        Ok(Self(normalised))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for Directory {
    type Error = InvalidValue;
    fn try_from(value: String) -> Result<Self, InvalidValue> {
        Self::parse(&value)
    }
}
impl From<Directory> for String {
    fn from(dir: Directory) -> String {
        dir.0
    }
}

/// A MIME type such as `application/zip`, as given by a client or guessed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MediaType(String);

impl MediaType {
    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        let invalid = || InvalidValue::new("asset_type", "must be a MIME type like 'application/zip'");
        if value.len() > MAX_MEDIA_TYPE_BYTES || value.chars().any(is_forbidden_char) {
            return Err(invalid());
        }
        let parsed: mime_guess::mime::Mime = value.parse().map_err(|_| invalid())?;
        if parsed.subtype().as_str().is_empty() {
            return Err(invalid()); // the mime crate takes "text/"
        }
        let normalised =
            if parsed.params().next().is_some() { parsed.to_string() } else { parsed.essence_str().to_owned() };
        // Bounded as stored (normalising may add spaces), so a stored one parses again.
        if normalised.len() > MAX_MEDIA_TYPE_BYTES {
            return Err(invalid());
        }
        Ok(Self(normalised))
    }
    /// The type for a file name, from its extension; `application/octet-stream` otherwise.
    pub fn guess_from_filename(name: &FileName) -> Self {
        Self(mime_guess::from_path(name.as_str()).first_or_octet_stream().essence_str().to_owned())
    }
    pub fn octet_stream() -> Self {
        Self("application/octet-stream".to_owned())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for MediaType {
    type Error = InvalidValue;
    fn try_from(value: String) -> Result<Self, InvalidValue> {
        Self::parse(&value)
    }
}
impl From<MediaType> for String {
    fn from(t: MediaType) -> String {
        t.0
    }
}

/// Free-form labels on an asset: bounded in number and length, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Tags(Vec<String>);

impl Tags {
    pub fn parse(tags: Vec<String>) -> Result<Self, InvalidValue> {
        if tags.len() > MAX_TAGS {
            return Err(InvalidValue::new("tags", format!("at most {MAX_TAGS} tags")));
        }
        for tag in &tags {
            if tag.is_empty() || tag.chars().count() > MAX_TAG_CHARS || tag.chars().any(is_forbidden_char) {
                return Err(InvalidValue::new(
                    "tags",
                    format!("each tag must be 1 to {MAX_TAG_CHARS} characters without control characters"),
                ));
            }
        }
        Ok(Self(tags))
    }
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}
impl TryFrom<Vec<String>> for Tags {
    type Error = InvalidValue;
    fn try_from(tags: Vec<String>) -> Result<Self, InvalidValue> {
        Self::parse(tags)
    }
}
impl From<Tags> for Vec<String> {
    fn from(tags: Tags) -> Vec<String> {
        tags.0
    }
}

/// The SHA-256 of an asset's bytes, as 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Hex(String);

impl Sha256Hex {
    pub fn from_digest(digest: &[u8]) -> Self {
        Self(hex::encode(digest))
    }
    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(value.to_ascii_lowercase()))
        } else {
            Err(InvalidValue::new("sha256", "must be 64 hexadecimal digits"))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for Sha256Hex {
    type Error = InvalidValue;
    fn try_from(value: String) -> Result<Self, InvalidValue> {
        Self::parse(&value)
    }
}
impl From<Sha256Hex> for String {
    fn from(h: Sha256Hex) -> String {
        h.0
    }
}

// JSON Schemas of the value types, for the contract files in `events/` (see
// `crate::contract`). They describe the values as stored and published, i.e. already
// normalised; a property test below holds each schema to its `parse`.

/// Characters no text value may hold ([`is_forbidden_char`]).
pub const CONTROL_CHARS: &str = r"\u0000-\u001F\u007F-\u009F\uFEFF";
/// Bidi overrides and isolates, refused in display names.
pub const BIDI_CHARS: &str = r"\u202A-\u202E\u2066-\u2069";

macro_rules! json_schema_of {
    ($type:ty, $name:literal, $schema:expr) => {
        impl schemars::JsonSchema for $type {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                let schema: serde_json::Value = $schema;
                schemars::Schema::try_from(schema).expect("a JSON Schema object")
            }
        }
    };
}

fn display_name_schema(description: &str, also_forbidden: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "string",
        "description": description,
        "minLength": 1,
        "maxLength": MAX_NAME_CHARS,
        "allOf": [
            {"pattern": format!("^[^{CONTROL_CHARS}{BIDI_CHARS}{also_forbidden}]*$")},
            {"pattern": r"\S"},
        ],
    })
}

json_schema_of!(
    SessionId,
    "SessionId",
    serde_json::json!({
        "type": "integer", "format": "int64", "minimum": 1, "maximum": i64::MAX,
        "description": "OpenTera's session id",
    })
);
json_schema_of!(FileName, "FileName", {
    let mut schema = display_name_schema("a file name: one path segment", r"/\\");
    schema["not"] = serde_json::json!({"enum": [".", ".."]});
    schema
});
json_schema_of!(AssetName, "AssetName", {
    let mut schema = display_name_schema("the asset's display name; no '..' path segment", "");
    schema["not"] = serde_json::json!({"pattern": r"(^|[/\\])\.\.([/\\]|$)"});
    schema
});
json_schema_of!(Directory, "Directory", {
    let segment = format!(r"[^/\\{CONTROL_CHARS}]+");
    serde_json::json!({
        "type": "string",
        "description": "a virtual folder: '/' or '/a/b' (no '.', '..' or blank segment)",
        "maxLength": MAX_DIRECTORY_CHARS,
        "pattern": format!("^/({segment}(/{segment})*)?$"),
        "not": {"pattern": r"/(\.{1,2}|\s+)(/|$)"},
    })
});
json_schema_of!(
    MediaType,
    "MediaType",
    serde_json::json!({
        "type": "string",
        "description": "a MIME type such as 'application/zip', parameters after ';'",
        "maxLength": MAX_MEDIA_TYPE_BYTES,
        "pattern": format!(r"^[^\s/;{CONTROL_CHARS}]+/[^\s/;{CONTROL_CHARS}]+(\s*;[^{CONTROL_CHARS}]*)?$"),
    })
);
json_schema_of!(
    Tags,
    "Tags",
    serde_json::json!({
        "type": "array",
        "maxItems": MAX_TAGS,
        "items": {
            "type": "string", "minLength": 1, "maxLength": MAX_TAG_CHARS,
            "pattern": format!("^[^{CONTROL_CHARS}]*$"),
        },
    })
);
json_schema_of!(
    Sha256Hex,
    "Sha256Hex",
    serde_json::json!({
        "type": "string", "pattern": "^[0-9a-f]{64}$", "description": "SHA-256 of the bytes, lower-case hex",
    })
);

/// How deeply free-form JSON may nest. Stored inside an event's payload and read back
/// by parsers with a nesting limit of their own (serde_json's is 128), so it must stay
/// well below that.
pub const MAX_JSON_DEPTH: usize = 32;

/// Free-form JSON (asset metadata) must be storable as Postgres `jsonb` and read back
/// as the same value: no NUL character in any string or key (`jsonb` refuses it), a
/// bounded nesting depth (see [`MAX_JSON_DEPTH`]), and numbers that survive `jsonb`'s
/// decimal form (it keeps `1e308` as 309 plain digits, which must parse to the same
/// `f64` again). A value that passes can never fail the reading of a row.
pub fn check_storable_json(field: &'static str, value: &serde_json::Value) -> Result<(), InvalidValue> {
    check_storable_json_at(field, value, 0)
}

fn check_storable_json_at(field: &'static str, value: &serde_json::Value, depth: usize) -> Result<(), InvalidValue> {
    use serde_json::Value;
    let nul = || InvalidValue::new(field, "must not contain the NUL character (\\u0000)");
    if depth > MAX_JSON_DEPTH {
        return Err(InvalidValue::new(field, format!("must not nest deeper than {MAX_JSON_DEPTH} levels")));
    }
    match value {
        Value::String(text) if text.contains('\0') => Err(nul()),
        Value::Number(number) => match number.as_f64() {
            Some(float) if number.is_f64() && !reads_back_from_plain_decimal(float) => {
                Err(InvalidValue::new(field, format!("the number {number} cannot be stored exactly")))
            }
            _ => Ok(()),
        },
        Value::Array(items) => items.iter().try_for_each(|item| check_storable_json_at(field, item, depth + 1)),
        Value::Object(map) => map.iter().try_for_each(|(key, item)| {
            if key.contains('\0') {
                return Err(nul());
            }
            check_storable_json_at(field, item, depth + 1)
        }),
        _ => Ok(()),
    }
}

/// Whether `value`, written as Postgres writes a `jsonb` number (plain decimal, no
/// exponent: what Rust's `Display` for `f64` prints too), parses back to itself.
fn reads_back_from_plain_decimal(value: f64) -> bool {
    value.is_finite() && serde_json::from_str::<f64>(&value.to_string()).is_ok_and(|again| again == value)
}

/// The date-times we store: years 1 to 9999 (Postgres and every client can hold them).
pub fn check_storable_datetime(
    field: &'static str,
    value: chrono::DateTime<chrono::Utc>,
) -> Result<chrono::DateTime<chrono::Utc>, InvalidValue> {
    use chrono::Datelike;
    match storable(value) {
        Some(value) if (1..=9999).contains(&value.year()) => Ok(value),
        _ => Err(InvalidValue::new(field, "must be a date-time between the years 1 and 9999")),
    }
}

/// `value` as Postgres keeps it: to the microsecond, a leap second as the next second.
/// Events record it so, so that they and the read models say the same.
pub fn storable(value: chrono::DateTime<chrono::Utc>) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_micros(value.timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stored_date_times_are_what_postgres_keeps() {
        let parse = |text: &str| chrono::DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&chrono::Utc);
        let stored = |text: &str| check_storable_datetime("t", parse(text)).map(|t| t.to_rfc3339());
        assert_eq!(stored("2026-01-02T03:04:05.123456789Z").unwrap(), "2026-01-02T03:04:05.123456+00:00");
        assert_eq!(stored("2016-12-31T23:59:60Z").unwrap(), "2017-01-01T00:00:00+00:00");
        assert!(stored("9999-12-31T23:59:60Z").is_err(), "rolls over into the year 10000");
        assert!(stored("9999-12-31T23:59:59.999999Z").is_ok());
    }

    #[test]
    fn file_names_refuse_paths_nul_and_overlong() {
        assert!(FileName::parse("report.pdf").is_ok());
        assert!(FileName::parse("données été.csv").is_ok());
        for bad in ["../etc/passwd", "a/b", "a\\b", "..", ".", "", "  ", "a\0b", "line\nbreak", "evil\u{202e}fdp.exe"] {
            assert!(FileName::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(FileName::parse(&"x".repeat(255)).is_ok());
        assert!(FileName::parse(&"x".repeat(1000)).is_err());
    }

    #[test]
    fn asset_names_refuse_traversal_but_allow_free_text() {
        assert!(AssetName::parse("Asset Name").is_ok());
        assert!(AssetName::parse("left/right view").is_ok());
        assert!(AssetName::parse("../secret").is_err());
        assert!(AssetName::parse("a/../b").is_err());
        assert!(AssetName::parse("nul\0").is_err());
    }

    #[test]
    fn directories_are_normalised_and_traversal_refused() {
        assert_eq!(Directory::parse("").unwrap().as_str(), "/");
        assert_eq!(Directory::parse("videos/day 1/").unwrap().as_str(), "/videos/day 1");
        assert_eq!(Directory::parse("//a//b").unwrap().as_str(), "/a/b");
        assert!(Directory::parse("/a/../b").is_err());
        assert!(Directory::parse("/a/./b").is_err());
        assert!(Directory::parse("/a\0").is_err());
        // Bounded as stored: a leading slash added must not make it unreadable.
        assert!(Directory::parse(&"a".repeat(MAX_DIRECTORY_CHARS)).is_err());
        assert!(Directory::parse(&format!("/{}", "a".repeat(MAX_DIRECTORY_CHARS - 1))).is_ok());
    }

    #[test]
    fn media_types_are_parsed() {
        assert_eq!(MediaType::parse("application/zip").unwrap().as_str(), "application/zip");
        assert_eq!(MediaType::parse("text/plain; charset=utf-8").unwrap().as_str(), "text/plain; charset=utf-8");
        assert!(MediaType::parse("not a type").is_err());
        assert!(MediaType::parse("text/").is_err());
        let guessed = MediaType::guess_from_filename(&FileName::parse("clip.mp4").unwrap());
        assert_eq!(guessed.as_str(), "video/mp4");
        let unknown = MediaType::guess_from_filename(&FileName::parse("blob.zzqq").unwrap());
        assert_eq!(unknown.as_str(), "application/octet-stream");
    }

    #[test]
    fn session_ids_are_positive() {
        assert!(SessionId::new(1).is_ok());
        assert!(SessionId::new(0).is_err());
        assert!(SessionId::new(-5).is_err());
    }

    #[test]
    fn json_with_nul_anywhere_is_refused() {
        use serde_json::json;
        assert!(check_storable_json("metadata", &json!({"a": [1, "b", {"c": null}]})).is_ok());
        assert!(check_storable_json("metadata", &json!({"a\0": 1})).is_err());
        assert!(check_storable_json("metadata", &json!({"a": ["x\0"]})).is_err());
    }

    #[test]
    fn json_nests_only_so_deep() {
        let nested = |depth: usize| (0..depth).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]));
        assert!(check_storable_json("metadata", &serde_json::json!({"a": nested(MAX_JSON_DEPTH - 1)})).is_ok());
        assert!(check_storable_json("metadata", &serde_json::json!({"a": nested(MAX_JSON_DEPTH)})).is_err());
    }

    #[test]
    fn extreme_numbers_read_back_from_postgres_decimal_form() {
        // As jsonb returns them: plain decimals, hundreds of digits long.
        for value in [f64::MAX, f64::MIN, f64::MIN_POSITIVE, 5e-324, 1e300, -1e-300, 0.1, 1e15] {
            assert!(reads_back_from_plain_decimal(value), "{value:e}");
            let number = serde_json::json!({ "n": value });
            assert!(check_storable_json("metadata", &number).is_ok(), "{value:e}");
        }
        let postgres_form_of_max = format!("17976931348623157{}", "0".repeat(292));
        assert_eq!(serde_json::from_str::<f64>(&postgres_form_of_max).unwrap(), f64::MAX);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        #[test]
        fn every_finite_double_reads_back_from_its_plain_decimal(bits in any::<u64>()) {
            let value = f64::from_bits(bits);
            prop_assume!(value.is_finite());
            prop_assert!(reads_back_from_plain_decimal(value), "{:e}", value);
        }
    }

    /// A compiled validator for `T`'s JSON Schema, built once per type.
    fn validator<T: schemars::JsonSchema>() -> &'static jsonschema::Validator {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        static VALIDATORS: OnceLock<Mutex<HashMap<String, &'static jsonschema::Validator>>> = OnceLock::new();
        let mut validators = VALIDATORS.get_or_init(Default::default).lock().unwrap();
        validators.entry(T::schema_name().into_owned()).or_insert_with(|| {
            let schema = schemars::SchemaGenerator::default().into_root_schema_for::<T>();
            Box::leak(Box::new(jsonschema::validator_for(schema.as_value()).expect("a valid schema")))
        })
    }

    /// The schema accepts exactly the values as stored: those `parse` accepts and leaves
    /// unchanged. Whatever `parse` accepts is stored in a form that parses again to
    /// itself (so replay can always read it back) and that the schema accepts. With
    /// `exact == false` the schema may accept more than `parse` does.
    fn schema_agrees_with_parse<T: schemars::JsonSchema + serde::Serialize>(
        input: &str,
        parse: fn(&str) -> Result<T, InvalidValue>,
        exact: bool,
    ) -> Result<(), TestCaseError> {
        let stored = |value: &T| serde_json::to_value(value).unwrap().as_str().unwrap().to_owned();
        let accepted = validator::<T>().is_valid(&serde_json::json!(input));
        match parse(input) {
            Ok(value) => {
                let stored_form = stored(&value);
                let again = parse(&stored_form);
                prop_assert!(again.is_ok(), "{input:?} is stored as {stored_form:?}, which does not parse");
                prop_assert_eq!(stored(&again.unwrap()), stored_form.clone());
                prop_assert!(
                    validator::<T>().is_valid(&serde_json::json!(stored_form)),
                    "schema refuses {stored_form:?}"
                );
                if stored_form == input {
                    prop_assert!(accepted);
                } else if exact {
                    prop_assert!(!accepted, "schema accepts the unnormalised {input:?}");
                }
            }
            Err(_) if exact => prop_assert!(!accepted, "schema accepts {input:?}, parse refuses it"),
            Err(_) => {}
        }
        Ok(())
    }

    /// Short strings of the characters the rules are about, and long ones near the bounds.
    fn tricky_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[-a./\\\\ \\t\\x00\\n\\x7f\\u{85}\\u{a0}\\u{feff}\\u{202e}\\u{2067}é;=+]{0,10}",
            "[a/]{250,260}",
            "/?[a/]{1018,1030}",
            "[a-z+.-]{1,8}/[a-z+.-]{0,8}(;|; )?[a-z]{0,4}=?[a-zA-Z0-9\"]{0,6}",
            "[a-z]{1,3}/[a-z;= ]{240,260}",
        ]
    }

    proptest! {
        #[test]
        fn value_schemas_accept_exactly_the_stored_values(input in tricky_text()) {
            schema_agrees_with_parse(&input, FileName::parse, true)?;
            schema_agrees_with_parse(&input, AssetName::parse, true)?;
            schema_agrees_with_parse(&input, Directory::parse, true)?;
            schema_agrees_with_parse(&input, MediaType::parse, false)?;
            schema_agrees_with_parse(&input, Sha256Hex::parse, true)?;
            schema_agrees_with_parse(&input.repeat(64).chars().take(64).collect::<String>(), Sha256Hex::parse, true)?;
        }

        #[test]
        fn tag_and_session_id_schemas_match_their_rules(tags in prop::collection::vec(tricky_text(), 0..70), id in any::<i64>()) {
            let accepted = validator::<Tags>().is_valid(&serde_json::json!(tags));
            prop_assert_eq!(accepted, Tags::parse(tags.clone()).is_ok(), "{:?}", tags);
            prop_assert_eq!(validator::<SessionId>().is_valid(&serde_json::json!(id)), SessionId::new(id).is_ok());
        }

        #[test]
        fn accepted_file_names_are_single_safe_segments(name in "\\PC{0,300}") {
            if let Ok(parsed) = FileName::parse(&name) {
                let s = parsed.as_str();
                prop_assert!(!s.contains('/') && !s.contains('\\') && !s.contains('\0'));
                prop_assert!(s != ".." && s.chars().count() <= MAX_NAME_CHARS);
            }
        }

        #[test]
        fn accepted_directories_never_climb(dir in "[a-z./\\\\ ]{0,40}") {
            if let Ok(parsed) = Directory::parse(&dir) {
                prop_assert!(parsed.as_str().starts_with('/'));
                prop_assert!(!parsed.as_str().split('/').any(|s| s == ".." || s == "."));
            }
        }
    }
}
