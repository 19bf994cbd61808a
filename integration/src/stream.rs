//! Line streams between namespaces, for the tests that measure when access ends (revoke,
//! quarantine, the 20-node bound): `socat` carries numbered lines, and a reader thread stamps
//! every line that arrives, so a test can ask when the last one came and how many there were.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Netns;

/// A child process (in its own process group) killed and reaped on drop.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// When the last line arrived and how many have, shared with the thread that reads them.
#[derive(Clone, Default)]
pub struct Arrivals(Arc<Mutex<Option<(Instant, u64)>>>);

impl Arrivals {
    /// Reads `from` line by line on a thread of its own until it ends, stamping each line.
    pub fn count(from: impl Read + Send + 'static) -> Arrivals {
        let arrivals = Arrivals::default();
        let seen = arrivals.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(from);
            let mut line = String::new();
            let mut count = 0u64;
            while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
                count += 1;
                *seen.0.lock().expect("no panic holds this lock") = Some((Instant::now(), count));
                line.clear();
            }
        });
        arrivals
    }

    /// The time of the last line and the number of lines so far; `None` before the first.
    pub fn last(&self) -> Option<(Instant, u64)> {
        *self.0.lock().expect("no panic holds this lock")
    }
}

/// A receiver in a namespace: `socat -u LISTEN STDOUT`, its lines counted.
pub struct Receiver {
    _child: Guard,
    arrivals: Arrivals,
}

impl Receiver {
    /// Starts `socat` on the `listen` address (e.g. `TCP4-LISTEN:5432,reuseaddr`) in `ns`.
    pub fn start(ns: &Netns, listen: &str) -> Receiver {
        let mut child = ns
            .command("socat")
            .args(["-u", listen, "STDOUT"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the receiver");
        let stdout = child.stdout.take().expect("receiver stdout");
        Receiver {
            _child: Guard(child),
            arrivals: Arrivals::count(stdout),
        }
    }

    /// See [`Arrivals::last`].
    pub fn last(&self) -> Option<(Instant, u64)> {
        self.arrivals.last()
    }
}

/// A sender in a namespace: `socat -u STDIN TARGET`, fed `seq N TAG` every `period` until it
/// is dropped or the connection ends.
pub struct Sender {
    _child: Guard,
    stop: Arc<AtomicBool>,
}

impl Sender {
    /// Starts it towards `target` (e.g. `TCP4:100.64.0.2:5432,connect-timeout=2`) in `ns`.
    pub fn start(ns: &Netns, target: &str, tag: &str, period: Duration) -> Sender {
        let mut child = ns
            .command("socat")
            .args(["-u", "STDIN", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the sender");
        let mut stdin: ChildStdin = child.stdin.take().expect("sender stdin");
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let tag = tag.to_string();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !halt.load(Ordering::Relaxed) {
                n += 1;
                if writeln!(stdin, "seq {n} {tag}").is_err() || stdin.flush().is_err() {
                    break;
                }
                // The stream's pace, not a wait for a condition.
                std::thread::sleep(period);
            }
        });
        Sender {
            _child: Guard(child),
            stop,
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `a` as socat writes a host: IPv6 in brackets.
pub fn socat_host(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}
