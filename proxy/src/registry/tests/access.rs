//! What the cache may serve to whom: fresh and stale approvals, public marks and how they are
//! learned and lost, repositories that share a blob, joining a download in flight, and the
//! registry's challenge while it cannot be asked.

use super::*;

#[tokio::test]
async fn the_cache_is_only_asked_about_when_the_facts_are_stale() {
    let s = scene().await;
    let layer = s.secret.layer(0);
    let private_head = format!("HEAD {HUB} /v2/alice/secret/blobs/{layer}");
    let public_head = format!("HEAD {QUAY} /v2/pub/open/blobs/");
    // A fresh approval: the owner's next pull is served without asking.
    let got =
        s.w.blob(HUB, "alice/secret", &layer, &[("authorization", ALICE)])
            .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(s.w.up.count(&private_head), 0);
    // A public image, anonymously: the public mark is fresh, nothing is asked either.
    let got = s.w.blob(QUAY, "pub/open", &s.open.layer(0), &[]).await;
    assert_eq!(got.body, s.open.layers[0]);
    assert_eq!(s.w.up.count(&public_head), 0);
    // A client with other credentials is checked with the upstream, which refuses.
    let got =
        s.w.blob(HUB, "alice/secret", &layer, &[("authorization", WRONG)])
            .await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.w.up.count(&private_head), 1);
}

#[tokio::test]
async fn public_images_are_served_to_anyone_when_the_upstream_is_down() {
    let s = scene().await;
    s.w.up.set(QUAY, State::Down);
    for creds in [Creds::Anonymous, Creds::Owner, Creds::WrongPassword] {
        let got =
            s.w.blob(QUAY, "pub/open", &s.open.layer(0), &creds.headers())
                .await;
        assert_eq!(got.status, StatusCode::OK, "{creds:?}");
        assert_eq!(got.body, s.open.layers[0]);
        let got = s.w.manifest(QUAY, "pub/open", "v1", &creds.headers()).await;
        assert_eq!(got.status, StatusCode::OK, "{creds:?}: the tag, stale");
        assert_eq!(got.body, s.open.manifest);
    }
    // The public blob is still not served under another repository or a made-up name.
    let got =
        s.w.blob(HUB, "library/busybox", &s.open.layer(0), &[])
            .await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    let got =
        s.w.blob("x.gcr.io", "pub/open", &s.open.layer(0), &[])
            .await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn private_tags_are_served_stale_only_to_their_owner() {
    let s = scene().await;
    s.w.up.set(HUB, State::Down);
    let got =
        s.w.manifest(HUB, "alice/secret", "v1", &[("authorization", ALICE)])
            .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, s.secret.manifest);
    for creds in [Creds::Anonymous, Creds::WrongPassword] {
        let got =
            s.w.manifest(HUB, "alice/secret", "v1", &creds.headers())
                .await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{creds:?}");
        assert_ne!(got.body, s.secret.manifest);
    }
    // The tag of another registry is never the same tag.
    s.w.up.set(QUAY, State::Down);
    let got =
        s.w.manifest(QUAY, "alice/secret", "v1", &[("authorization", ALICE)])
            .await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn joining_a_download_in_flight_needs_the_same_entitlement() {
    let w = World::new();
    let secret = Image::new("slow-secret", &[64 << 10]);
    w.up.push(HUB, "alice/secret", Some(ALICE), "v1", &secret);
    w.up.push(QUAY, "pub/open", None, "v1", &Image::new("o", &[10]));
    let layer = secret.layer(0);
    let gate = Arc::new(Notify::new());
    *w.up.gate.lock().unwrap() = Some(gate.clone());
    let w = Arc::new(w);
    // Alice's download starts and stalls after the first byte.
    let owner = {
        let w = w.clone();
        let layer = layer.clone();
        tokio::spawn(async move {
            w.blob(HUB, "alice/secret", &layer, &[("authorization", ALICE)])
                .await
        })
    };
    until("alice's download in flight", async || {
        w.cache.blobs().in_flight(&layer)
    })
    .await;
    // While it is in flight: the same digest for an anonymous client, another repository and a
    // wrong password is refused; it is never joined.
    let got = w.blob(HUB, "alice/secret", &layer, &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    let got = w.blob(QUAY, "pub/open", &layer, &[]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    let got = w
        .blob(HUB, "alice/secret", &layer, &[("authorization", WRONG)])
        .await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    // Alice's second client joins it (no second download), and both get every byte.
    let second = {
        let w = w.clone();
        let layer = layer.clone();
        tokio::spawn(async move {
            w.blob(HUB, "alice/secret", &layer, &[("authorization", ALICE)])
                .await
        })
    };
    until("the second client joined", async || {
        w.cache.blobs().stats().joins > 0
    })
    .await;
    gate.notify_one();
    for h in [owner, second] {
        let got = h.await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body, secret.layers[0]);
    }
    assert_eq!(
        w.up.blob_gets.load(Ordering::SeqCst),
        1,
        "one upstream download"
    );
}

#[tokio::test]
async fn a_blob_cached_for_one_repository_is_served_to_another_only_once_its_upstream_confirms() {
    let w = World::new();
    let shared = Image::new("shared", &[900]);
    w.up.push(QUAY, "team/a", None, "v1", &shared);
    w.up.push(QUAY, "team/b", None, "v1", &shared);
    w.pull(QUAY, "team/a", "v1", &shared, None).await;
    // team/b also holds it upstream: confirmed by a HEAD, then served from the cache.
    let gets = w.up.blob_gets.load(Ordering::SeqCst);
    let got = w.blob(QUAY, "team/b", &shared.layer(0), &[]).await;
    assert_eq!(got.body, shared.layers[0]);
    assert_eq!(
        w.up.blob_gets.load(Ordering::SeqCst),
        gets,
        "no second download"
    );
    assert!(
        w.cache
            .repos()
            .holds(QUAY, &"team/b".parse().unwrap(), &shared.layer(0))
    );
    // team/c does not: 404, and no link.
    let got = w.blob(QUAY, "team/c", &shared.layer(0), &[]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert!(
        !w.cache
            .repos()
            .holds(QUAY, &"team/c".parse().unwrap(), &shared.layer(0))
    );
}

#[tokio::test]
async fn public_marks_come_from_an_anonymous_probe_when_clients_send_credentials() {
    let w = World::new();
    let img = Image::new("tokened", &[100]);
    w.up.push(HUB, "library/nginx", None, "latest", &img);
    // Docker Hub's clients always send a (per-pull) token, even for public images.
    w.pull(HUB, "library/nginx", "latest", &img, Some("Bearer token-1"))
        .await;
    let repo: RepositoryName = "library/nginx".parse().unwrap();
    until("the repository probed public", async || {
        w.cache.repos().public_since(HUB, &repo).is_some()
    })
    .await;
    assert!(
        w.cache.repos().public_since(HUB, &repo).is_some(),
        "probed public"
    );
    // Upstream down, a new token: the public image is still served.
    w.up.set(HUB, State::Down);
    let got = w
        .blob(
            HUB,
            "library/nginx",
            &img.layer(0),
            &[("authorization", "Bearer token-2")],
        )
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, img.layers[0]);
}

#[tokio::test]
async fn a_private_repository_is_probed_private_and_new_tokens_get_nothing_offline() {
    let w = World::new();
    let img = Image::new("tok", &[100]);
    w.up.push(HUB, "alice/tok", Some("Bearer alice-1"), "v1", &img);
    w.pull(HUB, "alice/tok", "v1", &img, Some("Bearer alice-1"))
        .await;
    // Let the background probe run (it finds the repository private).
    until("the anonymous probe", async || {
        w.up.count(&format!("HEAD {HUB} /v2/alice/tok")) >= 1
    })
    .await;
    let repo: RepositoryName = "alice/tok".parse().unwrap();
    assert_eq!(w.cache.repos().public_since(HUB, &repo), None);
    w.up.set(HUB, State::Down);
    let got = w
        .blob(
            HUB,
            "alice/tok",
            &img.layer(0),
            &[("authorization", "Bearer alice-2")],
        )
        .await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_repository_that_turns_private_loses_its_public_mark() {
    let s = scene().await;
    let repo: RepositoryName = "pub/open".parse().unwrap();
    assert!(s.w.cache.repos().public_since(QUAY, &repo).is_some());
    s.w.up.push(QUAY, "pub/open", Some(ALICE), "v1", &s.open);
    // Past the fresh window the upstream is asked again; here a digest never cached forces it.
    let got = s.w.manifest(QUAY, "pub/open", "v1", &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.w.cache.repos().public_since(QUAY, &repo), None);
    s.w.up.set(QUAY, State::Down);
    // Not served: the registry's challenge instead (anonymous is not enough any more).
    let got = s.w.blob(QUAY, "pub/open", &s.open.layer(0), &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert_ne!(got.body, s.open.layers[0]);
}

#[tokio::test]
async fn offline_a_client_without_credentials_is_sent_the_registrys_challenge() {
    let s = scene().await;
    // An anonymous request taught pullproxy the registry's challenge.
    let got = s.w.manifest(HUB, "alice/secret", "v1", &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    s.w.up.set(HUB, State::Down);
    // /v2/ and the private tag: the challenge, so the client authenticates...
    let got = s.w.get(HUB, Method::GET, "/v2/", &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        got.headers[header::WWW_AUTHENTICATE],
        "Basic realm=\"fake\""
    );
    let got = s.w.manifest(HUB, "alice/secret", "v1", &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    let got = s.w.blob(HUB, "alice/secret", &s.secret.layer(0), &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    // ...and then gets what its credentials were approved for.
    let got =
        s.w.get(HUB, Method::GET, "/v2/", &[("authorization", ALICE)])
            .await;
    assert_eq!(got.status, StatusCode::OK);
    let got =
        s.w.manifest(HUB, "alice/secret", "v1", &[("authorization", ALICE)])
            .await;
    assert_eq!(got.body, s.secret.manifest);
    // Public content needs no credentials, and registries that never challenged say so.
    let got =
        s.w.blob(HUB, "library/busybox", &s.library.layer(0), &[])
            .await;
    assert_eq!(got.body, s.library.layers[0]);
    s.w.up.set(QUAY, State::Down);
    let got = s.w.get(QUAY, Method::GET, "/v2/", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
}

#[test]
fn bearer_challenges_are_rescoped_to_the_repository_asked_for() {
    let rule = crate::registry::content::ContentRule::new(
        Arc::new(Cache::in_memory(1 << 20)),
        Arc::new(FakeUpstream::default()),
    );
    let mut h = HeaderMap::new();
    h.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io""#,
        ),
    );
    rule.learn_challenge(HUB, StatusCode::UNAUTHORIZED, &h);
    let repo: RepositoryName = "library/nginx".parse().unwrap();
    assert_eq!(
        rule.challenge(HUB, Some(&repo)).unwrap(),
        r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#
    );
    assert_eq!(rule.challenge(QUAY, Some(&repo)), None);
    // Only 401s teach a challenge.
    rule.learn_challenge(QUAY, StatusCode::FORBIDDEN, &h);
    assert_eq!(rule.challenge(QUAY, None), None);
}

#[tokio::test]
async fn bearer_tokens_gate_cached_content_as_passwords_do() {
    const GITLAB: &str = "registry.gitlab.com";
    const TOKEN: &str = "Bearer alice-pull-team-app";
    const OTHER_TOKEN: &str = "Bearer alice-pull-team-other";
    let w = World::new();
    let img = Image::new("gitlab", &[2000, 500]);
    w.up.push(GITLAB, "team/app", Some(TOKEN), "1", &img);
    // No token: the registry's challenge goes back, so the client fetches a token from its realm.
    let got = w.manifest(GITLAB, "team/app", "1", &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert!(
        got.headers[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer realm=\"https://auth.fake/token\""),
        "{got:?}"
    );
    // With it: the token is forwarded, and what the registry serves is cached.
    w.pull(GITLAB, "team/app", "1", &img, Some(TOKEN)).await;
    assert_eq!(w.up.blob_gets.load(Ordering::SeqCst), 2);
    // Cached now: still nothing without a token, or with a token for another repository.
    for creds in [vec![], vec![("authorization", OTHER_TOKEN)]] {
        let got = w.manifest(GITLAB, "team/app", "1", &creds).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{creds:?}");
        assert_ne!(got.body, img.manifest);
        for (i, layer) in img.layers.iter().enumerate() {
            let got = w.blob(GITLAB, "team/app", &img.layer(i), &creds).await;
            assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{creds:?} layer {i}");
            assert!(
                !got.body
                    .windows(32)
                    .any(|b| layer.windows(32).any(|l| l == b)),
                "{creds:?} layer {i}: private bytes in the answer"
            );
        }
    }
    // The registry gone: the token it approved still pulls, from this node's cache; without a
    // token a client gets the challenge (rescoped to the repository), with another one 503.
    w.up.set(GITLAB, State::Down);
    w.pull(GITLAB, "team/app", "1", &img, Some(TOKEN)).await;
    assert_eq!(served(&w.proxy, "manifest", "stale"), 1);
    let got = w.blob(GITLAB, "team/app", &img.layer(0), &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert!(
        got.headers[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .ends_with(",scope=\"repository:team/app:pull\""),
        "{got:?}"
    );
    let got = w
        .blob(
            GITLAB,
            "team/app",
            &img.layer(0),
            &[("authorization", OTHER_TOKEN)],
        )
        .await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_ne!(got.body, img.layers[0]);
    assert_eq!(
        w.up.blob_gets.load(Ordering::SeqCst),
        2,
        "no download while cached"
    );
}
