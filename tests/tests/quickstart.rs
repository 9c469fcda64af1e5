//! `outpost up` in-process: two agents converge on every demo model and answer the printed curl
//! commands' requests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use firmware_config::CoordinatorConfig;
use outpost::quickstart::{self, Options};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_every_demo_model_on_every_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = CoordinatorConfig::default();
    coordinator.quic.listen = "127.0.0.1:0".parse().unwrap();
    coordinator.admin.listen = "127.0.0.1:0".parse().unwrap();
    coordinator.mqtt.listen = Some("127.0.0.1:0".parse().unwrap());
    let options = Options {
        agents: 2,
        first_port: 0,
        data_dir: dir.path().to_owned(),
        coordinator,
    };
    let mut lines = Vec::new();
    let running = quickstart::up(&options, |l| lines.push(l.to_owned()))
        .await
        .unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("2/2 agents serve every model")),
        "{lines:?}"
    );
    assert_eq!(running.agents.len(), 2);
    assert_ne!(
        running.agents[0].device_id, running.agents[1].device_id,
        "each agent has its own identity"
    );

    // Every curl command the quickstart prints works against the first agent.
    let examples = quickstart::curl_examples(running.agents[0].api_addr);
    for line in examples.lines() {
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap();
        let path = &url[url.find("/v").unwrap()..];
        let body = line
            .split_once(" -d '")
            .map(|(_, b)| b.trim_end_matches('\'').to_owned());
        let method = if body.is_some() { "POST" } else { "GET" };
        let body = body.unwrap_or_default();
        let mut stream = tokio::net::TcpStream::connect(running.agents[0].api_addr)
            .await
            .unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{line}\n{response}");
    }
    running.shutdown().await;
}
