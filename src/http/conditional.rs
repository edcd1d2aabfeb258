//! Conditional and range requests on a download (RFC 9110 §13 and §14): what the
//! request's `If-Match`, `If-Unmodified-Since`, `If-None-Match`, `If-Modified-Since`,
//! `If-Range` and `Range` ask of a representation, decided in one place so streamed and
//! X-Accel-Redirect downloads answer alike.
//!
//! Dates are read by `httpdate` (IMF-fixdate, RFC 850 and asctime, GMT only). Entity
//! tags and ranges have small parsers of their own, for reasons the `headers` crate's
//! typed headers do not meet: its entity-tag lists skip malformed members silently (a
//! list we cannot read must be a 400, not a condition that quietly never matches) and
//! debug-assert (panic, in debug builds) on a quoted tag holding a space; its `Range`
//! wants a lower-case unit and drops malformed parts of a list, where nginx, which
//! serves the same downloads with X-Accel-Redirect, reads them otherwise.

use chrono::{DateTime, Utc};
use warp::http::header::{HeaderMap, HeaderName, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE};
use warp::http::header::{IF_UNMODIFIED_SINCE, RANGE};

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

/// The answer the preconditions and the range call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// 304.
    NotModified,
    /// 412.
    PreconditionFailed,
    /// 200, 206 or 416, as the range says.
    Send(ByteRange),
}

/// A precondition header that is not what RFC 9110 says it is (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {0} header is not a valid entity-tag list")]
pub struct InvalidHeader(pub &'static str);

/// What the representation is, to compare the preconditions with.
#[derive(Debug, Clone, Copy)]
pub struct Validators<'a> {
    /// A strong entity tag, quotes included: `"sha256:…"`.
    pub etag: &'a str,
    /// `Last-Modified`, in whole seconds (HTTP dates have no finer precision).
    pub last_modified: DateTime<Utc>,
    pub size: u64,
}

/// Evaluates the preconditions in RFC 9110 §13.2.2 order, then the range, for a GET
/// (or a HEAD, which gets no range) at time `now`.
pub fn evaluate(
    request: &HeaderMap,
    representation: Validators<'_>,
    is_head: bool,
    now: DateTime<Utc>,
) -> Result<Decision, InvalidHeader> {
    let Validators { etag, last_modified, size } = representation;
    match entity_tags(request, IF_MATCH)? {
        Some(tags) if !tags.matches(etag, Comparison::Strong) => return Ok(Decision::PreconditionFailed),
        Some(_) => {}
        None => {
            if http_date(request, IF_UNMODIFIED_SINCE).is_some_and(|since| last_modified > since) {
                return Ok(Decision::PreconditionFailed);
            }
        }
    }
    match entity_tags(request, IF_NONE_MATCH)? {
        Some(tags) if tags.matches(etag, Comparison::Weak) => return Ok(Decision::NotModified),
        Some(_) => {}
        None => {
            // A date later than ours is not a date this server ever sent (§13.1.3): ignored.
            let since = http_date(request, IF_MODIFIED_SINCE).filter(|since| *since <= now);
            if since.is_some_and(|since| last_modified <= since) {
                return Ok(Decision::NotModified);
            }
        }
    }
    if is_head {
        return Ok(Decision::Send(ByteRange::Full));
    }
    // If-Range honours the range only while the representation is the one named: our
    // entity tag compared strongly, or our Last-Modified exactly (§13.1.5).
    let if_range_holds = match single_value(request, IF_RANGE) {
        None if request.contains_key(IF_RANGE) => false,
        None => true,
        Some(validator) => match validator.strip_prefix("W/") {
            Some(_) => false,
            None if validator.starts_with('"') => validator == etag,
            None => parse_http_date(validator) == Some(last_modified),
        },
    };
    if !if_range_holds {
        return Ok(Decision::Send(ByteRange::Full));
    }
    Ok(Decision::Send(parse_range(single_value(request, RANGE), size)))
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

/// An HTTP date in any of the three forms RFC 9110 §5.6.7 has recipients accept.
pub fn parse_http_date(value: &str) -> Option<DateTime<Utc>> {
    httpdate::parse_http_date(value.trim()).ok().map(DateTime::<Utc>::from)
}

/// `Last-Modified` and the like: IMF-fixdate.
pub fn format_http_date(time: DateTime<Utc>) -> String {
    httpdate::fmt_http_date(time.into())
}

/// The date of a date header, if it has exactly one valid one; otherwise the header is
/// ignored, as RFC 9110 §13.1.3 and §13.1.4 say.
fn http_date(request: &HeaderMap, name: HeaderName) -> Option<DateTime<Utc>> {
    single_value(request, name).and_then(parse_http_date)
}

/// The header's value when it is sent once and is text.
fn single_value(request: &HeaderMap, name: HeaderName) -> Option<&str> {
    let mut values = request.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().ok().map(str::trim),
        _ => None,
    }
}

#[derive(Clone, Copy)]
enum Comparison {
    /// Both tags strong and equal (If-Match, If-Range).
    Strong,
    /// Equal once `W/` is set aside (If-None-Match).
    Weak,
}

/// `*` or a list of entity tags (RFC 9110 §8.8.3, §13.1.1).
#[derive(Debug, PartialEq, Eq)]
enum EntityTags<'a> {
    Any,
    /// (weak, opaque tag with its quotes)
    List(Vec<(bool, &'a str)>),
}

impl EntityTags<'_> {
    fn matches(&self, etag: &str, comparison: Comparison) -> bool {
        match self {
            EntityTags::Any => true,
            EntityTags::List(tags) => tags.iter().any(|(weak, tag)| {
                *tag == etag.trim_start_matches("W/") && (matches!(comparison, Comparison::Weak) || !weak)
            }),
        }
    }
}

/// The entity tags of `name` (all its lines), `None` when absent.
fn entity_tags(request: &HeaderMap, name: HeaderName) -> Result<Option<EntityTags<'_>>, InvalidHeader> {
    let invalid = || InvalidHeader(if name == IF_MATCH { "If-Match" } else { "If-None-Match" });
    let mut tags = Vec::new();
    let mut any = false;
    let mut present = false;
    for value in request.get_all(&name) {
        present = true;
        let value = value.to_str().map_err(|_| invalid())?;
        match parse_entity_tag_list(value).ok_or_else(invalid)? {
            EntityTags::Any => any = true,
            EntityTags::List(list) => tags.extend(list),
        }
    }
    Ok(match (present, any) {
        (false, _) => None,
        // "*" stands alone.
        (true, true) if tags.is_empty() => Some(EntityTags::Any),
        (true, true) => return Err(invalid()),
        (true, false) => Some(EntityTags::List(tags)),
    })
}

/// `"*"` or `#entity-tag`: `[W/]"<etagc>*"` separated by commas, with optional
/// white space and empty elements (RFC 9110 §5.6.1). `etagc` is visible ASCII but `"`;
/// other octets (obs-text) are refused, as our tags never hold them.
fn parse_entity_tag_list(value: &str) -> Option<EntityTags<'_>> {
    let value = value.trim_matches([' ', '\t']);
    if value == "*" {
        return Some(EntityTags::Any);
    }
    let mut tags = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            return Some(EntityTags::List(tags));
        }
        let (weak, quoted) = match rest.strip_prefix("W/") {
            Some(after) => (true, after),
            None => (false, rest),
        };
        let body = quoted.strip_prefix('"')?;
        let end = body.find('"')?;
        if !body[..end].bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return None;
        }
        tags.push((weak, &quoted[..end + 2]));
        rest = quoted[end + 2..].trim_start_matches([' ', '\t']);
        // After a tag: the end, or a comma.
        if !(rest.is_empty() || rest.starts_with(',')) {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use warp::http::HeaderValue;

    const ETAG: &str = "\"sha256:ab\"";

    fn at(text: &str) -> DateTime<Utc> {
        parse_http_date(text).unwrap()
    }

    fn decide(headers: &[(&str, &str)], size: u64) -> Result<Decision, InvalidHeader> {
        let mut request = HeaderMap::new();
        for (name, value) in headers {
            request.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        let representation = Validators { etag: ETAG, last_modified: at("Sun, 06 Nov 1994 08:49:37 GMT"), size };
        evaluate(&request, representation, false, at("Wed, 01 Jan 2020 00:00:00 GMT"))
    }

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
        assert_eq!(parse_range(Some("BYTES=1-2"), 10), ByteRange::Partial { start: 1, end: 2 });
    }

    #[test]
    fn entity_tags_compare_weakly_for_if_none_match_and_strongly_for_if_match() {
        let not_modified = Ok(Decision::NotModified);
        let failed = Ok(Decision::PreconditionFailed);
        let full = Ok(Decision::Send(ByteRange::Full));
        assert_eq!(decide(&[("if-none-match", ETAG)], 10), not_modified);
        assert_eq!(decide(&[("if-none-match", "W/\"sha256:ab\", \"x\"")], 10), not_modified);
        assert_eq!(decide(&[("if-none-match", "\"x\""), ("if-none-match", ETAG)], 10), not_modified);
        assert_eq!(decide(&[("if-none-match", " , \"x\" ,, \"sha256:ab\" ")], 10), not_modified);
        assert_eq!(decide(&[("if-none-match", "*")], 10), not_modified);
        assert_eq!(decide(&[("if-none-match", "\"other\"")], 10), full);
        assert_eq!(decide(&[("if-match", "W/\"sha256:ab\"")], 10), failed);
        assert_eq!(decide(&[("if-match", "\"other\"")], 10), failed);
        assert_eq!(decide(&[("if-match", "*")], 10), full);
        assert_eq!(decide(&[("if-match", ETAG)], 10), full);
    }

    #[test]
    fn malformed_entity_tag_lists_are_refused() {
        for value in ["sha256:ab", "\"a b\"", "\"open", "W/", "\"a\" \"b\"", "*, \"a\"", "w/\"a\"", "\"a\"x"] {
            assert_eq!(decide(&[("if-none-match", value)], 10), Err(InvalidHeader("If-None-Match")), "{value}");
            assert_eq!(decide(&[("if-match", value)], 10), Err(InvalidHeader("If-Match")), "{value}");
        }
        let mut request = HeaderMap::new();
        request.insert(IF_NONE_MATCH, HeaderValue::from_bytes(b"\"caf\xc3\xa9\"").unwrap());
        let representation = Validators { etag: ETAG, last_modified: Utc::now(), size: 1 };
        assert_eq!(evaluate(&request, representation, false, Utc::now()), Err(InvalidHeader("If-None-Match")));
    }

    #[test]
    fn the_three_date_forms_are_read_and_bad_or_future_dates_ignored() {
        let not_modified = Ok(Decision::NotModified);
        let full = Ok(Decision::Send(ByteRange::Full));
        // RFC 9110 §5.6.7's example, in its three forms.
        for same in ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"] {
            assert_eq!(decide(&[("if-modified-since", same)], 10), not_modified, "{same}");
            assert_eq!(decide(&[("if-unmodified-since", same)], 10), full, "{same}");
        }
        assert_eq!(decide(&[("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT")], 10), full);
        assert_eq!(
            decide(&[("if-unmodified-since", "Sat, 05 Nov 1994 08:49:37 GMT")], 10),
            Ok(Decision::PreconditionFailed)
        );
        // Later than now (2020 in these tests): not a date we sent.
        assert_eq!(decide(&[("if-modified-since", "Fri, 01 Jan 2100 00:00:00 GMT")], 10), full);
        assert_eq!(decide(&[("if-modified-since", "Tue, 31 Dec 2019 00:00:00 GMT")], 10), not_modified);
        for bad in ["yesterday", "Sun, 06 Nov 1994 08:49:37 +0000", "Sun, 06 Nov 1994 08:49:37 CET", ""] {
            assert_eq!(decide(&[("if-modified-since", bad)], 10), full, "{bad}");
            assert_eq!(decide(&[("if-unmodified-since", bad)], 10), full, "{bad}");
        }
        let twice = [("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT"), ("if-modified-since", "x")];
        assert_eq!(decide(&twice, 10), full, "two members: ignored");
        // If-None-Match wins over If-Modified-Since.
        assert_eq!(
            decide(&[("if-none-match", "\"x\""), ("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")], 10),
            full
        );
        assert_eq!(format_http_date(at("Sunday, 06-Nov-94 08:49:37 GMT")), "Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[test]
    fn if_range_keeps_the_range_only_for_this_representation() {
        let partial = Ok(Decision::Send(ByteRange::Partial { start: 0, end: 1 }));
        let full = Ok(Decision::Send(ByteRange::Full));
        let range = ("range", "bytes=0-1");
        assert_eq!(decide(&[range], 10), partial);
        assert_eq!(decide(&[range, ("if-range", ETAG)], 10), partial);
        assert_eq!(decide(&[range, ("if-range", "W/\"sha256:ab\"")], 10), full);
        assert_eq!(decide(&[range, ("if-range", "\"old\"")], 10), full);
        assert_eq!(decide(&[range, ("if-range", "Sun, 06 Nov 1994 08:49:37 GMT")], 10), partial);
        assert_eq!(decide(&[range, ("if-range", "Sun Nov  6 08:49:37 1994")], 10), partial);
        assert_eq!(decide(&[range, ("if-range", "Sun, 06 Nov 1994 08:49:38 GMT")], 10), full);
        assert_eq!(decide(&[range, ("if-range", "garbage")], 10), full);
        assert_eq!(decide(&[range, ("range", "bytes=2-3")], 10), full, "two Range lines: ignored");
    }

    /// Header values as a client may send them: arbitrary bytes (those a header may
    /// hold at all), or text close to what the parsers look for.
    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            "[ \t]{0,2}(bytes|BYTES|items)?=?[ \t]{0,2}[0-9]{0,20}[ \t]{0,2}-?[ \t]{0,2}[0-9]{0,20}(,[ 0-9-]{0,8})?"
                .prop_map(String::into_bytes),
            "(W/)?\"?[a-z0-9: \"*,]{0,16}\"?(, ?(W/)?\"[a-z:0-9]{0,6}\")?".prop_map(String::into_bytes),
            "(Sun|Sunday|Mon),? [0-9]{1,2}[ -](Nov|Jan)[ -][0-9]{2,4} [0-9:]{8} (GMT|UTC)?"
                .prop_map(String::into_bytes),
            Just(ETAG.as_bytes().to_vec()),
            Just(b"*".to_vec()),
        ]
    }

    fn size() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..20, 0u64..5000, Just(u64::MAX), any::<u64>()]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// Whatever the headers hold: no panic, and a range served lies inside the file.
        #[test]
        fn any_conditional_or_range_headers_give_a_decision_within_the_file(
            values in proptest::collection::vec((0usize..6, header_value()), 0..5),
            size in size(),
            is_head in any::<bool>(),
            now in any::<u32>(),
        ) {
            let names = [RANGE, IF_RANGE, IF_MATCH, IF_NONE_MATCH, IF_MODIFIED_SINCE, IF_UNMODIFIED_SINCE];
            let mut request = HeaderMap::new();
            for (name, value) in values {
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    request.append(names[name].clone(), value);
                }
            }
            let representation = Validators { etag: ETAG, last_modified: at("Sun, 06 Nov 1994 08:49:37 GMT"), size };
            let now = DateTime::<Utc>::from_timestamp(i64::from(now), 0).unwrap();
            let decision = evaluate(&request, representation, is_head, now);
            if let Ok(Decision::Send(ByteRange::Partial { start, end })) = decision {
                prop_assert!(!is_head, "HEAD gets no range");
                prop_assert!(start <= end && end < size, "{start}-{end} of {size}");
            }
        }

        #[test]
        fn served_ranges_stay_inside_the_file(header in "(?s).{0,30}", size in size()) {
            if let ByteRange::Partial { start, end } = parse_range(Some(&header), size) {
                prop_assert!(start <= end && end < size);
            }
        }
    }
}
