//! The serving loop under clients that try to starve it, over real loopback TCP: slow headers,
//! idle keep-alive connections, more connections than the cap, bodies that stall or are too big.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use outpost_runtime::memory::MemoryBudget;
use outpost_runtime::serve::{
    BodyError, BodyLimits, ServeLimits, read_body, read_body_within, serve_http,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;

const HEADER_TIMEOUT: Duration = Duration::from_millis(300);

/// A server on a free loopback port whose handler reads the body within `body` and answers
/// 200 (or the body error's status), counting how many calls run at once.
async fn start(
    max_connections: usize,
    body: BodyLimits,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, watch::Sender<bool>) {
    start_within(max_connections, body, None).await
}

/// [`start`], with the bodies held at once in `budget` when one is given (503 past it).
async fn start_within(
    max_connections: usize,
    body: BodyLimits,
    budget: Option<MemoryBudget>,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let (active, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let most_seen = Arc::clone(&most);
    let handler = move |req: hyper::Request<hyper::body::Incoming>| {
        let (active, most, budget) = (Arc::clone(&active), Arc::clone(&most), budget.clone());
        async move {
            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let read = match &budget {
                Some(b) => read_body_within(req.into_body(), &body, b)
                    .await
                    .map(|_| ()),
                None => read_body(req.into_body(), &body).await.map(|_| ()),
            };
            let status = match read {
                Ok(()) => StatusCode::OK,
                Err(BodyError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
                Err(BodyError::TooSlow { .. }) => StatusCode::REQUEST_TIMEOUT,
                Err(BodyError::Busy { .. }) => StatusCode::SERVICE_UNAVAILABLE,
                Err(_) => StatusCode::BAD_REQUEST,
            };
            // Long enough that calls on other connections overlap.
            tokio::time::sleep(Duration::from_millis(100)).await;
            active.fetch_sub(1, Ordering::SeqCst);
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
            *r.status_mut() = status;
            r
        }
    };
    let limits = ServeLimits {
        max_connections,
        header_timeout: HEADER_TIMEOUT,
    };
    tokio::spawn(serve_http(listener, limits, handler, stopped));
    (addr, most_seen, stop)
}

fn small_bodies() -> BodyLimits {
    BodyLimits {
        max_bytes: 1 << 20,
        min_rate: 1 << 10,
        grace: Duration::from_millis(300),
        idle: Duration::from_secs(10),
    }
}

/// Sends `head` (and nothing more) and returns the status of the answer, or `None` when the
/// server closed the connection without one. Bounded at 10 s.
async fn status_after(stream: &mut TcpStream, head: &[u8]) -> Option<u16> {
    stream.write_all(head).await.unwrap();
    read_status(stream).await
}

async fn read_status(stream: &mut TcpStream) -> Option<u16> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                return;
            }
        }
    });
    read.await
        .expect("the server neither answered nor closed within 10 s");
    let text = String::from_utf8_lossy(&got);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

/// Waits (at most 5 s) until the server closes `stream`.
async fn closed_by_server(stream: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    read.await.expect("the server kept the connection open");
    start.elapsed()
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_cut_and_a_real_call_answers() {
    let (addr, _, _stop) = start(2, small_bodies()).await;
    // Two connections take every slot: one sends half a request head, one stays idle after its
    // answer.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: loc")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(status_after(&mut idle, GET).await, Some(200));

    // A real call still gets in, once the server has cut them.
    let started = Instant::now();
    let mut real = TcpStream::connect(addr).await.unwrap();
    assert_eq!(status_after(&mut real, GET).await, Some(200));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for stream in [&mut slow, &mut idle] {
        let after = closed_by_server(stream).await;
        assert!(after < Duration::from_secs(2), "closed after {after:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_their_turn_and_all_answer() {
    let (addr, most, _stop) = start(2, small_bodies()).await;
    let calls: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                // One request, then close: the slot frees for the next connection.
                status_after(
                    &mut s,
                    b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
                )
                .await
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), Some(200));
    }
    let most = most.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&most),
        "{most} calls ran at once past a cap of 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_is_cut_with_408() {
    let (addr, _, _stop) = start(4, small_bodies()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let status = status_after(
        &mut s,
        b"POST / HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100000\r\n\r\n0123456789",
    )
    .await;
    assert_eq!(status, Some(408));
    // Cut after the grace (300 ms) plus 10 bytes at 1 KiB/s, well before 100 000 bytes would be.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_over_the_limit_is_refused_before_it_is_sent() {
    let (addr, _, _stop) = start(4, small_bodies()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n",
        (1 << 20) + 1
    );
    assert_eq!(status_after(&mut s, head.as_bytes()).await, Some(413));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_is_refused() {
    let (addr, _, _stop) = start(4, small_bodies()).await;
    let s = TcpStream::connect(addr).await.unwrap();
    let mut request =
        b"POST / HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    let chunk = vec![b'x'; 64 << 10];
    for _ in 0..17 {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    // The server answers once the limit is passed and may close before the rest arrives: a
    // failed write is expected, the answer is what counts.
    let (mut reader, mut writer) = s.into_split();
    let sending = tokio::spawn(async move {
        let _ = writer.write_all(&request).await;
        writer
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut got)).await;
    let _ = sending.await;
    assert!(
        got.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_at_the_cap_make_room_for_a_real_call() {
    // A header timeout far longer than the test: only closing idle connections at the cap can
    // let the real call in.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = watch::channel(false);
    let handler = |_req: hyper::Request<hyper::body::Incoming>| async {
        Response::new(Full::new(Bytes::from_static(b"ok")))
    };
    let limits = ServeLimits {
        max_connections: 4,
        header_timeout: Duration::from_secs(60),
    };
    tokio::spawn(serve_http(listener, limits, handler, stopped));
    // Twenty connections that hold a slot and send nothing, or half a request head.
    let mut flood = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"GET / HTTP/1.1\r\nho").await.unwrap();
        }
        flood.push(s);
    }
    let started = Instant::now();
    let mut real = TcpStream::connect(addr).await.unwrap();
    assert_eq!(status_after(&mut real, GET).await, Some(200));
    let waited = started.elapsed();
    // 20 idle connections over 4 slots: about five rounds of EVICT_AFTER_IDLE.
    assert!(
        waited < Duration::from_secs(5),
        "the real call waited {waited:?}"
    );
    // The flood's first connections were closed by the server.
    let after = closed_by_server(&mut flood[0]).await;
    assert!(after < Duration::from_secs(2), "closed after {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_pauses_is_cut_by_the_idle_timeout_whatever_its_average() {
    // A rate and a grace that would allow a minute: only the pause between reads cuts it.
    let limits = BodyLimits {
        max_bytes: 1 << 20,
        min_rate: 1,
        grace: Duration::from_secs(60),
        idle: Duration::from_millis(300),
    };
    let (addr, _, _stop) = start(4, limits).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let status = status_after(
        &mut s,
        b"POST / HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1000\r\n\r\n0123456789",
    )
    .await;
    assert_eq!(status, Some(408));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// Bodies held at once are bounded across connections: while one holds the budget, another is
/// answered busy (503) after a short wait, and the budget comes back when the first is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_across_connections_share_one_budget() {
    let budget = MemoryBudget::new(1 << 20);
    let seen = budget.clone();
    let limits = BodyLimits {
        max_bytes: 1 << 20,
        min_rate: 1,
        grace: Duration::from_secs(60),
        idle: Duration::from_secs(60),
    };
    let (addr, _, _stop) = start_within(8, limits, Some(budget)).await;
    let head =
        |len: usize| format!("POST / HTTP/1.1\r\nhost: localhost\r\ncontent-length: {len}\r\n\r\n");
    // The first declares 900 KB and holds it, sending only its first bytes.
    let mut holder = TcpStream::connect(addr).await.unwrap();
    holder
        .write_all(format!("{}abc", head(900_000)).as_bytes())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.in_use() < 900_000 {
        assert!(Instant::now() < deadline, "the first body never reserved");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The second cannot fit beside it: busy, not buffered.
    let mut second = TcpStream::connect(addr).await.unwrap();
    let mut request = head(500_000).into_bytes();
    request.extend(std::iter::repeat_n(b'x', 500_000));
    assert_eq!(status_after(&mut second, &request).await, Some(503));
    // The first finishes; its budget comes back, and the second fits now.
    holder.write_all(&vec![b'y'; 900_000 - 3]).await.unwrap();
    assert_eq!(read_status(&mut holder).await, Some(200));
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert_eq!(status_after(&mut third, &request).await, Some(200));
    assert_eq!(seen.in_use(), 0);
}
