//! The `WWW-Authenticate: Bearer realm=...,service=...,scope=...` challenge of the distribution
//! token flow (RFC 6750 §3 syntax), and the token endpoint's answer: what pullproxy needs to ask a
//! registry, without credentials, whether a repository is public.

use serde::Deserialize;

/// Longest challenge header looked at.
const MAX_CHALLENGE_LEN: usize = 4096;

/// A Bearer challenge: where to get a token, for which service and scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerChallenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

impl BearerChallenge {
    /// Parses a `WWW-Authenticate` value; `None` unless it is a Bearer challenge with a realm.
    pub fn parse(header: &str) -> Option<BearerChallenge> {
        if header.len() > MAX_CHALLENGE_LEN {
            return None;
        }
        let (scheme, params) = header.trim_start().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut realm = None;
        let mut service = None;
        let mut scope = None;
        let mut rest = params.trim_start();
        while !rest.is_empty() {
            let (name, after) = rest.split_once('=')?;
            let name = name.trim();
            let (value, after) = quoted_or_token(after.trim_start())?;
            match name.to_ascii_lowercase().as_str() {
                "realm" => realm = Some(value),
                "service" => service = Some(value),
                "scope" => scope = Some(value),
                _ => {}
            }
            rest = after.trim_start();
            rest = match rest.strip_prefix(',') {
                Some(r) => r.trim_start(),
                None if rest.is_empty() => rest,
                None => return None,
            };
        }
        Some(BearerChallenge {
            realm: realm.filter(|r| !r.is_empty())?,
            service,
            scope,
        })
    }

    /// The token request: the realm with `service` and `scope` as query parameters.
    pub fn token_url(&self) -> String {
        let mut url = self.realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        for (name, value) in [("service", &self.service), ("scope", &self.scope)] {
            if let Some(v) = value {
                url.push(sep);
                url.push_str(name);
                url.push('=');
                url.push_str(&query_escape(v));
                sep = '&';
            }
        }
        url
    }
}

/// A quoted-string (backslash escapes) or a token, and what follows it.
fn quoted_or_token(s: &str) -> Option<(String, &str)> {
    if let Some(body) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return Some((out, &body[i + 1..])),
                '\\' => out.push(chars.next()?.1),
                c if c.is_control() => return None,
                c => out.push(c),
            }
        }
        None
    } else {
        let end = s.find([',', ' ', '\t']).unwrap_or(s.len());
        let token = &s[..end];
        (!token.is_empty() && !token.contains('"')).then(|| (token.to_owned(), &s[end..]))
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `:` `/` `@`, which scopes
/// (`repository:library/nginx:pull`) are made of.
fn query_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What a token endpoint answers (Docker's `token`, OAuth2's `access_token`).
#[derive(Debug, Deserialize)]
pub struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
}

impl TokenAnswer {
    /// The token, if the answer held a usable one (printable ASCII, for a header).
    pub fn into_token(self) -> Option<String> {
        self.token
            .or(self.access_token)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenge_parses_and_builds_the_token_url() {
        let c = BearerChallenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.docker.io/token");
        assert_eq!(
            c.token_url(),
            "https://auth.docker.io/token?service=registry.docker.io&scope=repository:library/nginx:pull"
        );
    }

    #[test]
    fn odd_but_valid_challenges_parse() {
        let c =
            BearerChallenge::parse(r#"bearer  scope="a b",realm=https://r.example/t?x=1"#).unwrap();
        assert_eq!(c.realm, "https://r.example/t?x=1");
        assert_eq!(c.token_url(), "https://r.example/t?x=1&scope=a%20b");
        let c = BearerChallenge::parse(r#"Bearer realm="q\"x""#).unwrap();
        assert_eq!(c.realm, "q\"x");
    }

    #[test]
    fn other_schemes_and_broken_challenges_are_refused() {
        for bad in [
            r#"Basic realm="registry""#,
            "Bearer",
            r#"Bearer service="x""#,
            r#"Bearer realm="unterminated"#,
            r#"Bearer realm="a" junk"#,
            r#"Bearer realm="""#,
            "Bearer realm=a\"b",
        ] {
            assert_eq!(BearerChallenge::parse(bad), None, "{bad}");
        }
        assert_eq!(
            BearerChallenge::parse(&format!("Bearer realm=\"{}\"", "x".repeat(5000))),
            None
        );
    }

    #[test]
    fn token_answers_give_a_header_safe_token() {
        let t: TokenAnswer = serde_json::from_str(r#"{"token":"abc.def"}"#).unwrap();
        assert_eq!(t.into_token().as_deref(), Some("abc.def"));
        let t: TokenAnswer = serde_json::from_str(r#"{"access_token":"x"}"#).unwrap();
        assert_eq!(t.into_token().as_deref(), Some("x"));
        let t: TokenAnswer = serde_json::from_str(r#"{"token":"a\nb"}"#).unwrap();
        assert_eq!(t.into_token(), None);
    }
}
