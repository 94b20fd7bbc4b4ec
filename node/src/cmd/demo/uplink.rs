//! The site's "uplink": a TCP relay on loopback between the devices and the server
//! that counts the bytes crossing it, and can be cut (the site goes offline).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;

#[derive(Debug, Default)]
struct Shared {
    /// Where connections go; `None`: the link is down.
    target: Mutex<Option<SocketAddr>>,
    /// Bytes from the server to the site.
    down: AtomicU64,
    /// Bytes from the site to the server.
    up: AtomicU64,
    stop: AtomicBool,
    /// Open connections (both ends), to cut them when the link goes down.
    open: Mutex<BTreeMap<u64, (TcpStream, TcpStream)>>,
    next: AtomicU64,
}

/// The uplink; stops its threads and cuts its connections when dropped.
#[derive(Debug)]
pub struct Uplink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Uplink {
    /// Listens on a free loopback port; down until [`Uplink::connect_to`].
    pub fn start() -> anyhow::Result<Uplink> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("cannot listen for the site's uplink")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("demo-uplink".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if s.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(client) = client {
                        relay(&s, client);
                    }
                }
            })
            .context("cannot start the uplink")?;
        Ok(Uplink {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The URL devices use to reach the server.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Forwards to `server` from now on, or (`None`) takes the link down: open
    /// connections are cut and new ones are closed at once.
    pub fn connect_to(&self, server: Option<SocketAddr>) {
        if let Ok(mut t) = self.shared.target.lock() {
            *t = server;
        }
        if server.is_none() {
            let open =
                std::mem::take(&mut *self.shared.open.lock().unwrap_or_else(|e| e.into_inner()));
            for (a, b) in open.values() {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
    }

    /// Bytes carried from the server to the site so far.
    pub fn bytes_down(&self) -> u64 {
        self.shared.down.load(Ordering::SeqCst)
    }

    /// Bytes carried from the site to the server so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.up.load(Ordering::SeqCst)
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.connect_to(None);
        // Wakes the accept loop, which then sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn relay(s: &Arc<Shared>, client: TcpStream) {
    let target = *s.target.lock().unwrap_or_else(|e| e.into_inner());
    let Some(target) = target else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    ) else {
        return;
    };
    let id = s.next.fetch_add(1, Ordering::SeqCst);
    s.open
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, (c3, s3));
    let (up, down) = (Arc::clone(s), Arc::clone(s));
    let _ = std::thread::Builder::new()
        .name("demo-uplink-up".into())
        .spawn(move || pipe(c2, s2, &up.up));
    let _ = std::thread::Builder::new()
        .name("demo-uplink-down".into())
        .spawn(move || {
            pipe(server, client, &down.down);
            down.open
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
}

fn pipe(mut from: TcpStream, mut to: TcpStream, count: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        count.fetch_add(n as u64, Ordering::SeqCst);
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
