//! `cup login` tries the credentials with the registry before vmmd keeps
//! them, as `docker login` does.
//!
//! # Design
//! The distribution API's own check: `GET /v2/` without credentials. A
//! registry that answers 200 wants none (the login is kept all the same,
//! as Docker keeps it). One that answers 401 names its scheme in
//! `WWW-Authenticate`: for `Basic`, `/v2/` again with the credentials; for
//! `Bearer realm=...,service=...`, the realm (the token server) with the
//! credentials, as every pull would ask it. 200 there is a login; 401 or
//! 403 is a wrong user or password. A registry is spoken to over HTTPS
//! unless it is one of the plain-HTTP ones (`--insecure-registry`,
//! registries.toml); a token server the registry names must be HTTPS then
//! too, so the password never crosses the network in the clear unless the
//! operator chose plain HTTP for that registry.

use std::collections::BTreeMap;
use std::time::Duration;

/// How long the whole check may take.
const TIMEOUT: Duration = Duration::from_secs(20);
/// The longest challenge header read.
const MAX_CHALLENGE: usize = 4096;

/// Why a login was not kept.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{registry}: unauthorized: incorrect username or password for {user:?}; nothing kept")]
    Refused { registry: String, user: String },
    #[error("cannot reach {registry} ({url}): {why}; nothing kept (a registry served over plain HTTP must be listed as insecure: --insecure-registry or registries.toml)")]
    Unreachable {
        registry: String,
        url: String,
        why: String,
    },
    #[error("{registry}: {what}; not a container registry? nothing kept")]
    NotARegistry { registry: String, what: String },
}

/// An authentication challenge: its scheme (lower case) and parameters.
#[derive(Debug, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

/// Parses a `WWW-Authenticate` header of one challenge: `Basic
/// realm="x"`, `Bearer realm="https://auth",service="reg",scope="..."`.
/// None for anything else (several challenges, a malformed one).
pub fn challenge(header: &str) -> Option<Challenge> {
    if header.len() > MAX_CHALLENGE {
        return None;
    }
    let header = header.trim();
    let (scheme, mut rest) = match header.split_once(' ') {
        Some((s, r)) => (s, r.trim_start()),
        None => (header, ""),
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    let mut params = BTreeMap::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return None;
        }
        let after = after.trim_start();
        let (value, after) = match after.strip_prefix('"') {
            Some(q) => {
                // A quoted string; \" and \\ are its escapes.
                let mut value = String::new();
                let mut chars = q.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => value.push(chars.next()?.1),
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &q[end?..])
            }
            None => {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            }
        };
        if params.insert(key, value).is_some() {
            return None;
        }
        let after = after.trim_start();
        rest = match after.strip_prefix(',') {
            Some(r) => r.trim_start(),
            None if after.is_empty() => "",
            None => return None,
        };
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// Where a registry as `cup login` names it is spoken to.
fn endpoint(registry: &str) -> &str {
    match registry {
        "docker.io" => "registry-1.docker.io",
        other => other,
    }
}

/// Tries `user` and `password` with `registry` (`HOST[:PORT]`, over plain
/// HTTP when `insecure`).
pub fn check(registry: &str, user: &str, password: &str, insecure: bool) -> Result<(), LoginError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scheme = if insecure { "http" } else { "https" };
    let base = format!("{scheme}://{}/v2/", endpoint(registry));
    let unreachable = |url: &str, e: &dyn std::error::Error| LoginError::Unreachable {
        registry: registry.to_string(),
        url: url.to_string(),
        why: steelcup_sys::error_chain(e),
    };
    let not_registry = |what: String| LoginError::NotARegistry {
        registry: registry.to_string(),
        what,
    };
    let refused = || LoginError::Refused {
        registry: registry.to_string(),
        user: user.to_string(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| unreachable(&base, &e))?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(|e| unreachable(&base, &e))?;
        let first = client
            .get(&base)
            .send()
            .await
            .map_err(|e| unreachable(&base, &e))?;
        let status = first.status();
        if status.is_success() {
            return Ok(());
        }
        if status != reqwest::StatusCode::UNAUTHORIZED {
            return Err(not_registry(format!("GET {base} answered {status}")));
        }
        let header = first
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let c = challenge(header).ok_or_else(|| {
            not_registry(format!(
                "GET {base} answered 401 with no challenge this client knows ({:?})",
                header.chars().take(120).collect::<String>()
            ))
        })?;
        let answer = match c.scheme.as_str() {
            "basic" => client
                .get(&base)
                .basic_auth(user, Some(password))
                .send()
                .await
                .map_err(|e| unreachable(&base, &e))?,
            "bearer" => {
                let realm = c
                    .params
                    .get("realm")
                    .ok_or_else(|| not_registry("a Bearer challenge without a realm".into()))?;
                let secure_realm =
                    realm.starts_with("https://") || (insecure && realm.starts_with("http://"));
                if !secure_realm {
                    return Err(not_registry(format!(
                        "its token server {realm:?} is not HTTPS; the password is not sent there"
                    )));
                }
                let mut query = vec![("account", user)];
                if let Some(s) = c.params.get("service") {
                    query.push(("service", s));
                }
                client
                    .get(realm)
                    .query(&query)
                    .basic_auth(user, Some(password))
                    .send()
                    .await
                    .map_err(|e| unreachable(realm, &e))?
            }
            other => {
                return Err(not_registry(format!(
                    "it asks for {other:?} authentication; Basic and Bearer are known"
                )))
            }
        };
        match answer.status() {
            s if s.is_success() => Ok(()),
            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => Err(refused()),
            s => Err(not_registry(format!("the credentials' check answered {s}"))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_read_as_registries_write_them() {
        let c = challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/busybox:pull");
        let c = challenge(r#"Basic realm="steelcup-test""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "steelcup-test");
        let c = challenge(r#"Bearer realm="a \"q\" b", service=reg"#).unwrap();
        assert_eq!(c.params["realm"], r#"a "q" b"#);
        assert_eq!(c.params["service"], "reg");
        assert_eq!(challenge("Basic").unwrap().params.len(), 0);
        // What two readers could take differently is refused.
        for bad in [
            r#"Bearer realm="unterminated"#,
            r#"Bearer realm="a" realm2="b""#,
            r#"Bearer realm="a",realm="b""#,
            r#"Bearer =x"#,
            "",
        ] {
            assert_eq!(challenge(bad), None, "{bad}");
        }
        assert_eq!(challenge(&"x".repeat(MAX_CHALLENGE + 1)), None);
    }

    #[test]
    fn an_unreachable_registry_keeps_nothing_and_says_so() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = check(&format!("127.0.0.1:{port}"), "u", "p", true).unwrap_err();
        assert!(
            matches!(e, LoginError::Unreachable { .. }) && e.to_string().contains("nothing kept"),
            "{e}"
        );
    }
}
