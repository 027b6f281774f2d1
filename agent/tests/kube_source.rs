//! The Kubernetes source against a real list/watch HTTP server (no API server
//! can be installed here): kube-rs talks to it exactly as to a real one.

use catena_agent::sources::kube::watch_kubernetes;
use catena_agent::sources::watch::SourceUpdate;
use catena_agent::sources::ObjectKey;
use catena_lab::apiserver::ApiServer;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::sync::watch;

fn service(name: &str, ip: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"clusterIP": ip, "ports": [{"port": 80}], "selector": {"app": name}}})
}

fn client(server: &ApiServer) -> kube::Client {
    let config = kube::Config::new(server.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

/// Waits until a published snapshot satisfies `pred`, checking `invariant` on
/// every snapshot seen on the way.
async fn wait_for(
    rx: &mut watch::Receiver<SourceUpdate>,
    what: &str,
    pred: impl Fn(&SourceUpdate) -> bool,
    invariant: impl Fn(&SourceUpdate) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        {
            let update = rx.borrow_and_update();
            assert!(
                invariant(&update),
                "invariant broken in generation {}: {:?}",
                update.generation,
                update.state.services.keys().collect::<Vec<_>>()
            );
            if pred(&update) {
                return;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

fn has_service(u: &SourceUpdate, name: &str) -> bool {
    u.state.services.contains_key(&ObjectKey::new("shop", name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_watches_and_survives_410_and_dropped_streams() {
    let server = ApiServer::start().unwrap();
    server.apply(service("web", "10.96.0.10")).unwrap();
    server
        .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}}))
        .unwrap();
    // More pods than one page (the source lists 5000 per page).
    for i in 0..5200 {
        server
            .apply(json!({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": format!("p{i}"), "namespace": "shop", "labels": {"app": "web"}},
                          "spec": {"containers": [{"name": "c"}]},
                          "status": {"podIP": format!("10.{}.{}.{}", 1 + i / 62500, i / 250 % 250, i % 250 + 1)}}))
            .unwrap();
    }
    // The Cilium CRDs are not installed: the source must still become ready.
    server.set_missing("CiliumNetworkPolicy", true);
    server.set_missing("CiliumClusterwideNetworkPolicy", true);

    let mut rx = watch_kubernetes(client(&server)).await.unwrap();
    {
        let first = rx.borrow_and_update();
        assert!(has_service(&first, "web"));
        assert_eq!(first.state.pods.len(), 5200, "all pages listed");
        assert_eq!(first.state.namespaces.len(), 1);
    }
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains("/api/v1/pods") && r.contains("continue=")),
        "pods were listed in pages"
    );

    // Live changes arrive through the watch.
    server.apply(service("api", "10.96.0.11")).unwrap();
    wait_for(
        &mut rx,
        "api added",
        |u| has_service(u, "api"),
        |u| has_service(u, "web"),
    )
    .await;
    server.delete("Service", "shop", "api").unwrap();
    wait_for(
        &mut rx,
        "api deleted",
        |u| !has_service(u, "api"),
        |u| has_service(u, "web"),
    )
    .await;

    // History compacted and every stream cut: the watchers get 410 Gone and
    // re-list. A change made meanwhile shows up, and no snapshot on the way
    // ever lacks `web` (no flush during the re-list).
    server.compact();
    server.drop_watches();
    server.apply(service("db", "10.96.0.12")).unwrap();
    wait_for(
        &mut rx,
        "db after re-list",
        |u| has_service(u, "db"),
        |u| has_service(u, "web"),
    )
    .await;
    // `db` can arrive through a watcher that happened to reconnect at the
    // newest version; the others resume from compacted history and must get
    // 410 (they may do so a moment later on a loaded machine).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.gone_answers() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        server.gone_answers() > 0,
        "resumed watches were answered 410 Gone and re-listed"
    );

    // The API server goes away for a while: the last state stays, then resumes.
    server.set_unavailable(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(has_service(&rx.borrow(), "web") && has_service(&rx.borrow(), "db"));
    server.set_unavailable(false);
    server.apply(service("cache", "10.96.0.13")).unwrap();
    wait_for(
        &mut rx,
        "cache after outage",
        |u| has_service(u, "cache"),
        |u| has_service(u, "web") && has_service(u, "db"),
    )
    .await;
}
