//! The data path on loopback (no namespace needed): TCP through per-core listeners, UDP flows
//! with batched receive and send (GSO in, GRO out), and the SIGTERM handover to a second data
//! path bound alongside.
#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(clippy::disallowed_methods, reason = "tests time real sockets")]

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use kproxy_contract::{IpFamily, Protocol, ServicePortName};

use super::{DataPath, Options};
use crate::model::{Frontend, ListenerKey, Table, Transport};

/// A single-threaded runtime with I/O, for the data path's unit tests that need tokio sockets.
pub(super) fn io_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap()
}

pub(super) fn table(endpoint: SocketAddr) -> Arc<Table> {
    Arc::new(Table {
        service: ServicePortName {
            namespace: "ns".into(),
            name: "svc".into(),
            port: "".into(),
            protocol: Protocol::Tcp,
        },
        family: IpFamily::V4,
        frontend: Frontend::ClusterIp,
        endpoints: vec![endpoint],
        keep: BTreeSet::from([endpoint]),
        affinity: None,
        source_ranges: Vec::new(),
    })
}

fn free_port() -> u16 {
    // Both transports: a port neither uses now.
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn lo(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// A TCP server answering each connection's bytes with the same bytes, until it closes.
fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        while let Ok((mut c, _)) = l.accept() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn udp_echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, peer)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], peer);
        }
    });
    addr
}

/// Polls `pred` for up to 10 s.
fn wait(mut pred: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if pred() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn options() -> Options {
    Options {
        workers: 2,
        grace_period: Duration::from_secs(2),
        threads: super::Threads::Shared,
        ..Options::default()
    }
}

fn per_core() -> Options {
    Options {
        threads: super::Threads::PerCore,
        ..options()
    }
}

fn roundtrip(to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(to).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).unwrap();
    got
}

#[test]
fn tcp_through_per_core_listeners_and_bulk_both_ways() {
    tcp_and_bulk(options());
    tcp_and_bulk(per_core());
}

fn tcp_and_bulk(options: Options) {
    let echo = tcp_echo();
    let key = ListenerKey {
        transport: Transport::Tcp,
        addr: lo(free_port()),
    };
    let mut dp = DataPath::new(options.clone()).unwrap();
    assert!(dp.apply(&[], &[], &[(key, table(echo))]).is_empty());
    // Many connections land on both workers' sockets (the kernel hashes them).
    for i in 0..50u8 {
        assert_eq!(roundtrip(key.addr, &[i; 100]), [i; 100]);
    }
    // A megabyte each way, through the pipes.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut c = TcpStream::connect(key.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = c.try_clone().unwrap();
    let sent = big.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
    let mut got = vec![0u8; big.len()];
    c.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == big, "the bytes came back changed");
    drop(c);
    assert!(
        wait(|| dp.connections() == 0),
        "{} connections left",
        dp.connections()
    );
}

/// A worker that is busy (here: its thread blocked) leaves the connections the kernel hashed to
/// its socket waiting; another worker takes them when it would otherwise sleep (`steal.rs`).
/// Without that, about half of these connections would wait for the blocked worker and time
/// out. Once the listener is closed, its address is free again.
#[test]
fn a_busy_worker_s_waiting_connections_are_taken_by_an_idle_one() {
    let echo = tcp_echo();
    let key = ListenerKey {
        transport: Transport::Tcp,
        addr: lo(free_port()),
    };
    let mut dp = DataPath::new(per_core()).unwrap();
    assert!(dp.apply(&[], &[], &[(key, table(echo))]).is_empty());
    // A socket is offered to other workers from its first connection on; the kernel hashes
    // these over both sockets (all 40 to one: a chance of 2^-39).
    for i in 0..40u8 {
        assert_eq!(roundtrip(key.addr, &[i; 10]), [i; 10]);
    }
    // Worker 0's thread blocks until released (or 20 s); `done` tells whether it still is.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (blocked_tx, blocked) = std::sync::mpsc::channel::<()>();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    dp.workers[0].handle.spawn(async move {
        blocked_tx.send(()).unwrap();
        let _ = released.recv_timeout(Duration::from_secs(20));
        d.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    blocked.recv_timeout(Duration::from_secs(5)).unwrap();
    // Worker 1 has other work every 10 ms: it takes waiting connections only when it goes
    // back to sleep, not when one arrives.
    dp.workers[1].handle.spawn(async {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
        }
    });
    for i in 0..20u8 {
        let mut c = TcpStream::connect(key.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.write_all(&[i; 100]).unwrap();
        let mut got = [0u8; 100];
        c.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("connection {i} was not served: {e}"));
        assert_eq!(got, [i; 100]);
    }
    assert!(
        !done.load(std::sync::atomic::Ordering::SeqCst),
        "worker 0 was not blocked throughout"
    );
    release.send(()).unwrap();
    // Closing the listener closes its sockets: what lets other workers take connections does
    // not keep them open.
    assert!(dp.apply(&[(key, table(echo))], &[], &[]).is_empty());
    TcpListener::bind(key.addr).expect("the closed listener's sockets are closed");
}

/// Messages move through each thread's buffer and skip the read that would only say `EAGAIN`;
/// this drives what that could break: one connection exchanging messages just below, at and
/// above the buffer's size in turn (a missed readiness would hang an exchange), a reader that
/// stops reading while many messages come (the destination's buffer fills and the rest waits),
/// and a client that half-closes after its request and still gets the whole answer and the end.
#[test]
fn messages_around_the_buffer_size_a_slow_reader_and_half_close() {
    use super::copy::SMALL;
    for options in [options(), per_core()] {
        let echo = tcp_echo();
        let key = ListenerKey {
            transport: Transport::Tcp,
            addr: lo(free_port()),
        };
        let mut dp = DataPath::new(options).unwrap();
        assert!(dp.apply(&[], &[], &[(key, table(echo))]).is_empty());

        let mut c = TcpStream::connect(key.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.set_nodelay(true).unwrap();
        for (i, len) in [1, 1000, SMALL - 1, SMALL, SMALL + 1, 1, 3 * SMALL + 7, 2]
            .into_iter()
            .enumerate()
        {
            let msg: Vec<u8> = (0..len).map(|j| (i * 31 + j % 253) as u8).collect();
            c.write_all(&msg).unwrap();
            let mut got = vec![0u8; len];
            c.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("message {i} of {len} bytes: {e}"));
            assert!(got == msg, "message {i} of {len} bytes came back changed");
        }
        drop(c);

        // 4 MB in 1,000-byte writes while the client reads nothing for half a second.
        let mut c = TcpStream::connect(key.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            for k in 0..4000u32 {
                w.write_all(&[(k % 251) as u8; 1000]).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let mut got = vec![0u8; 4_000_000];
        c.read_exact(&mut got).unwrap();
        writer.join().unwrap();
        assert!(
            got.chunks(1000)
                .enumerate()
                .all(|(k, chunk)| chunk.iter().all(|&b| b == (k % 251) as u8)),
            "the bytes came back out of order"
        );
        drop(c);

        // Request, half-close, then the whole echo and the end of stream.
        let mut c = TcpStream::connect(key.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(&[7u8; 5000]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, vec![7u8; 5000]);
        drop(c);

        assert!(
            wait(|| dp.connections() == 0),
            "{} connections left",
            dp.connections()
        );
    }
}

#[test]
fn udp_flows_batch_and_pass_coalesced_datagrams_on() {
    udp_flows(options());
    udp_flows(per_core());
}

fn udp_flows(options: Options) {
    let echo = udp_echo();
    let key = ListenerKey {
        transport: Transport::Udp,
        addr: lo(free_port()),
    };
    let mut dp = DataPath::new(options.clone()).unwrap();
    assert!(dp.apply(&[], &[], &[(key, table(echo))]).is_empty());
    // 100 flows, each a few round trips; every reply comes from the service address.
    let clients: Vec<UdpSocket> = (0..100)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        })
        .collect();
    for round in 0..3u8 {
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&[round, i as u8], key.addr).unwrap();
        }
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 16];
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&[round, i as u8][..], key.addr));
        }
    }
    // A GSO send of three 1000-byte datagrams: on loopback the listener (UDP_GRO) receives it
    // coalesced, passes it on as one GSO send, and the echo sees three datagrams.
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let seg = 1000u16;
    let data: Vec<u8> = (0..3000u32).map(|i| (i / 1000) as u8).collect();
    let gso = nix::sys::socket::sendmsg(
        std::os::fd::AsRawFd::as_raw_fd(&c),
        &[std::io::IoSlice::new(&data)],
        &[nix::sys::socket::ControlMessage::UdpGsoSegments(&seg)],
        nix::sys::socket::MsgFlags::empty(),
        Some(&nix::sys::socket::SockaddrStorage::from(key.addr)),
    );
    if gso.is_ok() {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..3 {
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!((n, from), (1000, key.addr));
            seen.push(buf[0]);
        }
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2]);
    }
}

#[test]
fn handover_waits_for_a_successor_then_closes_without_resetting() {
    let echo = tcp_echo();
    let key = ListenerKey {
        transport: Transport::Tcp,
        addr: lo(free_port()),
    };
    let mut old = DataPath::new(options()).unwrap();
    assert!(old.apply(&[], &[], &[(key, table(echo))]).is_empty());
    // An established connection through the old data path.
    let mut held = TcpStream::connect(key.addr).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    held.write_all(b"x").unwrap();
    held.read_exact(&mut [0u8; 1]).unwrap();
    let stopping = std::thread::spawn(move || {
        let report = old.handover(Duration::from_secs(5), Duration::from_secs(5));
        (report, old)
    });
    // No successor yet: the old one still accepts.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(roundtrip(key.addr, b"still"), b"still");
    // The successor binds alongside (SO_REUSEPORT); the old one closes its listeners.
    let mut new = DataPath::new(options()).unwrap();
    assert!(new.apply(&[], &[], &[(key, table(echo))]).is_empty());
    for _ in 0..50 {
        assert_eq!(roundtrip(key.addr, b"during"), b"during");
    }
    // The held connection still works; closing it lets the old one finish.
    held.write_all(b"y").unwrap();
    held.read_exact(&mut [0u8; 1]).unwrap();
    drop(held);
    let (report, old) = stopping.join().unwrap();
    drop(old);
    assert_eq!(report.handed_over, 1, "{report:?}");
    assert_eq!(report.without_successor, 0, "{report:?}");
    assert_eq!(report.connections_cut, 0, "{report:?}");
    for _ in 0..20 {
        assert_eq!(roundtrip(key.addr, b"after"), b"after");
    }
}

#[test]
fn a_taken_port_is_bound_once_it_is_free() {
    let echo = tcp_echo();
    // Taken by a socket without SO_REUSEPORT: kproxy cannot join it.
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let key = ListenerKey {
        transport: Transport::Tcp,
        addr: squatter.local_addr().unwrap(),
    };
    let mut dp = DataPath::new(options()).unwrap();
    let errors = dp.apply(&[], &[], &[(key, table(echo))]);
    assert_eq!(errors.len(), 1);
    assert!(dp.listeners().contains_key(&key));
    drop(squatter);
    assert!(
        wait(
            || TcpStream::connect(key.addr).is_ok_and(|mut c| c.write_all(b"z").is_ok()
                && c.set_read_timeout(Some(Duration::from_millis(500))).is_ok()
                && c.read_exact(&mut [0u8; 1]).is_ok())
        ),
        "never served after the port came free"
    );
}

#[test]
fn handover_without_a_successor_closes_after_the_wait_and_cuts_nothing_idle() {
    let echo = tcp_echo();
    let key = ListenerKey {
        transport: Transport::Tcp,
        addr: lo(free_port()),
    };
    let mut dp = DataPath::new(options()).unwrap();
    assert!(dp.apply(&[], &[], &[(key, table(echo))]).is_empty());
    assert_eq!(roundtrip(key.addr, b"a"), b"a");
    let started = std::time::Instant::now();
    let report = dp.handover(Duration::from_millis(300), Duration::from_secs(2));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{report:?}"
    );
    assert_eq!((report.handed_over, report.without_successor), (0, 1));
    assert_eq!(report.connections_cut, 0, "{report:?}");
    // Closed: nothing listens any more.
    assert!(TcpStream::connect(key.addr).is_err());
}

/// Listeners past the budget get one socket each, spread over the threads.
#[test]
fn listeners_past_the_socket_budget_get_one_socket_each_in_turn() {
    let mut last = 0;
    let places: Vec<(usize, usize)> = (0..6)
        .map(|running| super::Place::next(running, 2, 3, &mut last))
        .map(|p| (p.sockets, p.first))
        .collect();
    assert_eq!(places, [(3, 0), (3, 0), (1, 1), (1, 2), (1, 0), (1, 1)]);
}
