//! The hub, for `pullproxy doctor`: reachable, accepting pullproxy's credentials, and letting
//! them push when write-back is on. No credential is ever part of a finding.

use std::{path::PathBuf, time::Duration};

use super::{HubClient, HubOutcome, HubSettings, PasswordSource};
use crate::{
    config::WriteBackPolicy,
    diagnosis::{Check, Finding},
    origins::{
        client::{self, AddressPolicy, Connector},
        tls::upstream_client_config,
    },
    telemetry::error_chain,
};

/// Asks the hub of `settings` (`None`: no hub configured) for `/v2/` with pullproxy's
/// credentials, over TLS that trusts the system roots and `extra_upstream_cas`, and with
/// write-back on, whether those credentials may push.
pub(crate) async fn diagnose(
    settings: Option<&HubSettings>,
    extra_upstream_cas: &[PathBuf],
    connect_timeout: Duration,
) -> Vec<Finding> {
    let Some(settings) = settings else {
        return vec![Finding::ok(
            Check::Hub,
            "no hub configured (hub.url is null)",
        )];
    };
    let shown = redacted_url(&settings.url);
    let client_tls = match upstream_client_config(extra_upstream_cas, None) {
        Ok((c, _)) => c,
        Err(e) => {
            return vec![Finding::problem(
                Check::Hub,
                format!("cannot build a TLS client for the hub: {}", error_chain(&e)),
            )];
        }
    };
    let http = client::build(Connector::new(
        client_tls,
        AddressPolicy::Any,
        connect_timeout,
    ));
    let hub = HubClient::new(http, settings.clone());
    let optional = if settings.optional {
        " (hub.optional: pulls fall back to cache and upstream)"
    } else {
        " (pullproxy stays unready until it is; set hub.optional: true to serve without it)"
    };
    let failed = match hub.ping().await {
        HubOutcome::Found(_) => {
            let reached = Finding::ok(
                Check::Hub,
                format!("hub {shown} reachable and accepts pullproxy's credentials"),
            );
            let push = push_rights(settings.write_back, &hub, &shown).await;
            return [reached].into_iter().chain(push).collect();
        }
        HubOutcome::NotFound => Finding::problem(
            Check::Hub,
            format!("hub {shown} answers 404 on /v2/: hub.url does not point at a registry"),
        ),
        HubOutcome::Refused(status) => Finding::problem(
            Check::Hub,
            format!(
                "hub {shown} refused pullproxy's credentials ({}): fix hub.username and the \
                 password in {}",
                status.as_u16(),
                credential_source(&settings.password)
            ),
        ),
        HubOutcome::Unreachable(reason) => Finding::problem(
            Check::Hub,
            format!("hub {shown} unreachable: {reason}{optional}"),
        ),
        HubOutcome::NoCredentials(reason) => Finding::problem(
            Check::Hub,
            format!("cannot read the hub credentials: {reason}{optional}"),
        ),
    };
    vec![failed]
}

/// With write-back on, pullproxy's hub credentials must be allowed to push.
async fn push_rights(policy: WriteBackPolicy, hub: &HubClient, shown: &str) -> Option<Finding> {
    if policy == WriteBackPolicy::Off {
        return None;
    }
    Some(match hub.can_push().await {
        Ok(true) => Finding::ok(
            Check::Hub,
            format!("pullproxy's hub credentials may push (hub.write_back: {policy})"),
        ),
        Ok(false) => Finding::problem(
            Check::Hub,
            format!(
                "hub {shown} does not let pullproxy's credentials push, and hub.write_back is \
                 {policy}: give the user push rights, or set hub.write_back: off"
            ),
        ),
        Err(e) => Finding::problem(
            Check::Hub,
            format!("cannot tell whether pullproxy may push into hub {shown}: {e}"),
        ),
    })
}

/// Where the hub password comes from, named without its value.
fn credential_source(source: &PasswordSource) -> String {
    match source {
        PasswordSource::File(f) => format!("hub.password_file ({})", f.display()),
        PasswordSource::DockerConfigJson(f) => format!("hub.dockerconfigjson ({})", f.display()),
        PasswordSource::Inline(_) => "hub.password".into(),
        PasswordSource::None => "hub.password_file (none is configured)".into(),
    }
}

/// The hub URL without any `user:password@`.
fn redacted_url(url: &http::Uri) -> String {
    let scheme = url.scheme_str().unwrap_or("http");
    let host = url.host().unwrap_or_default();
    match url.port_u16() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;
    use crate::{diagnosis::Verdict, settings::Config};

    const PASSWORD: &str = "inline-password-9b41";

    /// The hub settings of the defaults with these `PULLPROXY_HUB__*` overrides.
    fn hub(vars: &[(&str, String)]) -> HubSettings {
        let env = vars
            .iter()
            .map(|(k, v)| (format!("PULLPROXY_HUB__{k}"), v.clone()));
        Config::defaults_with(env).unwrap().hub.unwrap()
    }

    async fn run(settings: &HubSettings) -> Vec<Finding> {
        diagnose(Some(settings), &[], Duration::from_secs(2)).await
    }

    /// A port on 127.0.0.1 that nothing listens on (bound, then let go).
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    /// A hub on 127.0.0.1 that answers every request with `status` and no body.
    async fn answering(status: u16) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut request = [0; 4096];
                let _ = conn.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = conn.write_all(response.as_bytes()).await;
            }
        });
        port
    }

    /// Every way a finding is shown: printed, and debugged.
    fn shown(findings: &[Finding]) -> String {
        let printed: Vec<String> = findings.iter().map(ToString::to_string).collect();
        format!("{printed:?} {findings:?}")
    }

    #[test]
    fn urls_lose_their_credentials() {
        let url: http::Uri = "http://admin:s3cret@sealos.hub:5000/".parse().unwrap();
        assert_eq!(redacted_url(&url), "http://sealos.hub:5000");
        let url: http::Uri = "https://hub.example".parse().unwrap();
        assert_eq!(redacted_url(&url), "https://hub.example");
    }

    #[tokio::test]
    async fn no_hub_is_fine() {
        let found = diagnose(None, &[], Duration::from_secs(2)).await;
        assert_eq!(
            found,
            vec![Finding::ok(
                Check::Hub,
                "no hub configured (hub.url is null)"
            )]
        );
    }

    #[tokio::test]
    async fn an_unreachable_hub_is_a_problem_named_without_credentials() {
        let port = closed_port();
        // (A password inside hub.url is refused when the configuration loads.)
        let settings = hub(&[
            ("URL", format!("http://127.0.0.1:{port}")),
            ("USERNAME", "admin".into()),
            ("PASSWORD", PASSWORD.into()),
        ]);
        let found = run(&settings).await;
        let [finding] = &found[..] else {
            panic!("{found:?}")
        };
        assert_eq!(finding.verdict, Verdict::Problem, "{finding}");
        let message = &finding.message;
        assert!(
            message.starts_with(&format!("hub http://127.0.0.1:{port} unreachable: "))
                && message.ends_with(
                    " (pullproxy stays unready until it is; set hub.optional: true to serve \
                     without it)"
                ),
            "{message}"
        );
        assert!(!shown(&found).contains(PASSWORD), "{}", shown(&found));

        let settings = hub(&[
            ("URL", format!("http://127.0.0.1:{port}")),
            ("OPTIONAL", "true".into()),
        ]);
        let found = run(&settings).await;
        assert!(
            found[0]
                .message
                .ends_with(" (hub.optional: pulls fall back to cache and upstream)"),
            "{found:?}"
        );
    }

    #[tokio::test]
    async fn refused_credentials_name_their_source_not_their_value() {
        let port = answering(401).await;
        let settings = hub(&[
            ("URL", format!("http://127.0.0.1:{port}")),
            ("USERNAME", "admin".into()),
            ("PASSWORD", PASSWORD.into()),
        ]);
        let found = run(&settings).await;
        assert_eq!(
            found,
            vec![Finding::problem(
                Check::Hub,
                format!(
                    "hub http://127.0.0.1:{port} refused pullproxy's credentials (401): fix \
                     hub.username and the password in hub.password"
                )
            )]
        );
        assert!(!shown(&found).contains(PASSWORD), "{}", shown(&found));
    }

    #[tokio::test]
    async fn a_hub_that_is_no_registry_is_named() {
        let port = answering(404).await;
        let found = run(&hub(&[("URL", format!("http://127.0.0.1:{port}"))])).await;
        assert_eq!(
            found,
            vec![Finding::problem(
                Check::Hub,
                format!(
                    "hub http://127.0.0.1:{port} answers 404 on /v2/: hub.url does not point at \
                     a registry"
                )
            )]
        );
    }
}
