//! The request id: taken from a sane incoming `X-Request-Id` or made up, kept in a
//! task-local for the whole request (handlers, error bodies, logs) and echoed in the
//! response's `X-Request-Id`.

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The current request's id ("" outside a request).
pub fn current() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

/// Runs `future` with `id` as the current request id.
pub async fn scope<F: std::future::Future>(id: String, future: F) -> F::Output {
    REQUEST_ID.scope(id, future).await
}

/// An incoming id is reused when it is short and plain; anything else is replaced.
pub fn from_header(value: Option<&str>) -> String {
    match value {
        Some(id)
            if !id.is_empty()
                && id.len() <= 128
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) =>
        {
            id.to_owned()
        }
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sane_ids_are_kept_and_others_replaced() {
        assert_eq!(super::from_header(Some("abc-123")), "abc-123");
        assert_ne!(super::from_header(Some("bad id\n")), "bad id\n");
        assert_eq!(super::from_header(None).len(), 36);
    }
}
