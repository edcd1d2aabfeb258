//! The methods each path answers, for the `Allow` header of a 405 (RFC 9110 §15.5.6),
//! read from the OpenAPI document: the routes' own annotations, so a route added with
//! its annotation is listed without anyone editing a table here. (A test checks, route
//! by route, that what this says is what the routes do.)

use warp::http::HeaderValue;

/// Path templates (relative to the base path) and the methods they answer.
pub(crate) struct AllowedMethods {
    base_path: String,
    /// Segments (`None`: a `{parameter}`), methods.
    routes: Vec<(Vec<Option<String>>, Vec<&'static str>)>,
}

/// The order methods are listed in.
const METHODS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"];

impl AllowedMethods {
    pub fn from_openapi(base_path: &str) -> Self {
        let document = super::openapi::document(base_path);
        let mut routes: Vec<(Vec<Option<String>>, Vec<&'static str>)> = document
            .paths
            .paths
            .iter()
            .map(|(path, item)| {
                let segments =
                    segments(path).map(|s| (!(s.starts_with('{') && s.ends_with('}'))).then(|| s.to_owned())).collect();
                let operations = [&item.get, &item.get, &item.post, &item.put, &item.delete, &item.patch];
                let methods = METHODS.iter().zip(operations).filter(|(_, op)| op.is_some()).map(|(m, _)| *m).collect();
                (segments, methods)
            })
            .collect();
        // The Swagger UI (`/doc`, `/doc/`, `/doc/<file>`) is not in its own document.
        for doc in [vec![Some("doc".to_owned())], vec![Some("doc".to_owned()), None]] {
            routes.push((doc, vec!["GET", "HEAD"]));
        }
        Self { base_path: base_path.to_owned(), routes }
    }

    /// `Allow` for a request path (base path included), if any route has this path.
    pub fn for_path(&self, path: &str) -> Option<HeaderValue> {
        let rest = path.strip_prefix(&self.base_path)?;
        let wanted: Vec<&str> = segments(rest).collect();
        let mut allowed: Vec<&str> = Vec::new();
        for (template, methods) in &self.routes {
            let matches = template.len() == wanted.len()
                && template.iter().zip(&wanted).all(|(t, w)| t.as_deref().is_none_or(|t| t == *w));
            if matches {
                allowed.extend(methods);
            }
        }
        if allowed.is_empty() {
            return None;
        }
        let listed: Vec<&str> = METHODS.iter().copied().filter(|m| allowed.contains(m)).collect();
        HeaderValue::from_str(&listed.join(", ")).ok()
    }
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn methods_come_from_the_openapi_document() {
        let allowed = super::AllowedMethods::from_openapi("/file");
        let allow = |path: &str| allowed.for_path(path).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(allow("/file/api/assets").as_deref(), Some("GET, HEAD, POST, DELETE"));
        assert_eq!(allow("/file/api/assets/infos").as_deref(), Some("GET, HEAD, POST"));
        assert_eq!(allow("/file/api/sessions/7").as_deref(), Some("GET, HEAD, PUT, DELETE"));
        assert_eq!(allow("/file/api/sessions/7/assets/").as_deref(), Some("GET, HEAD"));
        assert_eq!(allow("/file/doc/index.html").as_deref(), Some("GET, HEAD"));
        assert_eq!(allow("/file/api/nowhere"), None);
        assert_eq!(allow("/elsewhere/api/assets"), None);
    }
}
