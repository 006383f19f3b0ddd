//! The hub, for `pullproxy doctor`: reachable, accepting pullproxy's credentials, and letting
//! them push when write-back is on. No credential is ever printed.

use std::sync::Arc;

use super::{Check, DoctorReport};
use crate::{
    origins::{
        client::{self, AddressPolicy, Connector},
        hub::{HubClient, HubOutcome, PasswordSource},
        tls::upstream_client_config,
    },
    settings::Config,
    telemetry::error_chain,
};

pub(super) async fn check_hub(report: &mut DoctorReport, config: &Config) {
    let Some(settings) = &config.hub else {
        report.ok(Check::Hub, "no hub configured (hub.url is null)");
        return;
    };
    let shown = redacted_url(&settings.url);
    let client_tls = match upstream_client_config(&config.tls.extra_upstream_cas, None) {
        Ok((c, _)) => c,
        Err(e) => {
            report.problem(
                Check::Hub,
                format!("cannot build a TLS client for the hub: {}", error_chain(&e)),
            );
            return;
        }
    };
    let http = client::build(Connector::new(
        client_tls,
        AddressPolicy::Any,
        config.upstream.connect_timeout,
    ));
    let hub = Arc::new(HubClient::new(http, settings.clone()));
    let optional = if settings.optional {
        " (hub.optional: pulls fall back to cache and upstream)"
    } else {
        " (pullproxy stays unready until it is; set hub.optional: true to serve without it)"
    };
    match hub.ping().await {
        HubOutcome::Found(_) => {
            report.ok(
                Check::Hub,
                format!("hub {shown} reachable and accepts pullproxy's credentials"),
            );
            check_push_rights(report, settings.write_back, &hub, &shown).await;
        }
        HubOutcome::NotFound => report.problem(
            Check::Hub,
            format!("hub {shown} answers 404 on /v2/: hub.url does not point at a registry"),
        ),
        HubOutcome::Refused(status) => report.problem(
            Check::Hub,
            format!(
                "hub {shown} refused pullproxy's credentials ({}): fix hub.username and the \
                 password in {}",
                status.as_u16(),
                credential_source(&settings.password)
            ),
        ),
        HubOutcome::Unreachable(reason) => report.problem(
            Check::Hub,
            format!("hub {shown} unreachable: {reason}{optional}"),
        ),
        HubOutcome::NoCredentials(reason) => report.problem(
            Check::Hub,
            format!("cannot read the hub credentials: {reason}{optional}"),
        ),
    }
}

/// With write-back on, pullproxy's hub credentials must be allowed to push.
async fn check_push_rights(
    report: &mut DoctorReport,
    policy: crate::config::WriteBackPolicy,
    hub: &HubClient,
    shown: &str,
) {
    if policy == crate::config::WriteBackPolicy::Off {
        return;
    }
    match hub.can_push().await {
        Ok(true) => report.ok(
            Check::Hub,
            format!("pullproxy's hub credentials may push (hub.write_back: {policy})"),
        ),
        Ok(false) => report.problem(
            Check::Hub,
            format!(
                "hub {shown} does not let pullproxy's credentials push, and hub.write_back is \
                 {policy}: give the user push rights, or set hub.write_back: off"
            ),
        ),
        Err(e) => report.problem(
            Check::Hub,
            format!("cannot tell whether pullproxy may push into hub {shown}: {e}"),
        ),
    }
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
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        let url: http::Uri = "http://admin:s3cret@sealos.hub:5000/".parse().unwrap();
        assert_eq!(redacted_url(&url), "http://sealos.hub:5000");
        let url: http::Uri = "https://hub.example".parse().unwrap();
        assert_eq!(redacted_url(&url), "https://hub.example");
    }
}
