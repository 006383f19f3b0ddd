//! The ClientHello peek: the first bytes of a redirected connection, as the client sent them.
//!
//! Input: raw bytes from the client.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullproxy::accept::client_hello::{ClientHelloPeek, PEEK_LIMIT, parse_client_hello};
use rustls::server::Acceptor;
use rustls_pki_types::DnsName;

fuzz_target!(|data: &[u8]| {
    let outcome = parse_client_hello(data);
    match &outcome {
        ClientHelloPeek::Sni(name, _) => {
            // What the minter and the upstream origin are built from: a valid DNS name, in the
            // one spelling the minter's host set uses.
            assert!(DnsName::try_from(name.as_str()).is_ok(), "{name:?}");
            assert_eq!(*name, name.to_ascii_lowercase());
            assert!(!name.ends_with('.'), "{name:?}");
        }
        // The peek loop asks again on Incomplete; at the limit that would only wait for the
        // deadline, so a full buffer is always judged.
        ClientHelloPeek::Incomplete => assert!(data.len() < PEEK_LIMIT, "incomplete at the limit"),
        ClientHelloPeek::NotTls | ClientHelloPeek::NoSni | ClientHelloPeek::Malformed(_) => {}
    }

    // Once judged, more bytes do not change the judgment: the server decides on whatever prefix
    // the first peek returned, so a longer read must not have decided otherwise.
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        let early = parse_client_hello(&data[..cut]);
        if early != ClientHelloPeek::Incomplete {
            assert_eq!(early, outcome, "decided at {cut} of {} bytes", data.len());
        }
    }

    // The same bytes repeated up to the peek limit: judged, and as the start alone was if that
    // was judged already.
    if !data.is_empty() {
        let full: Vec<u8> = data.iter().copied().cycle().take(PEEK_LIMIT).collect();
        let judged = parse_client_hello(&full);
        assert_ne!(
            judged,
            ClientHelloPeek::Incomplete,
            "a full peek must be judged"
        );
        if outcome != ClientHelloPeek::Incomplete {
            assert_eq!(judged, outcome, "more bytes changed the judgment");
        }
    }

    // The name the server routes by is the name rustls hands the certificate resolver: both
    // parse the same bytes, so where both succeed they must agree.
    if let ClientHelloPeek::Sni(..) | ClientHelloPeek::NoSni = outcome
        && let Some(rustls_sni) = rustls_server_name(data)
    {
        let ours = match &outcome {
            ClientHelloPeek::Sni(name, _) => Some(name.as_str()),
            _ => None,
        };
        assert_eq!(ours, rustls_sni.as_deref(), "our peek and rustls disagree");
    }
});

/// The server name rustls reads from the same bytes, when it accepts them as a ClientHello
/// (`None` inside: accepted, without a name).
fn rustls_server_name(mut data: &[u8]) -> Option<Option<String>> {
    let mut acceptor = Acceptor::default();
    while !data.is_empty() {
        match acceptor.read_tls(&mut data) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Ok(Some(accepted)) = acceptor.accept() {
            let name = accepted
                .client_hello()
                .server_name()
                .map(|n| n.strip_suffix('.').unwrap_or(n).to_ascii_lowercase());
            return Some(name);
        }
    }
    None
}
