//! Processes started inside a lab pod or node: in its network namespace and its
//! cgroup, so the node's BPF programs see them exactly as a real pod's.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::fd::AsFd,
    path::Path,
    process::{Child, Command, ExitStatus, Output},
    time::{Duration, Instant},
};

use lacewing_sys::os;

/// A process the lab started. Dropping it kills it (by its pid) and reaps it.
#[derive(Debug)]
pub struct LabProcess {
    child: Child,
    /// Where it runs (`n0-p1`), for messages.
    place: String,
}

impl LabProcess {
    /// Starts `cmd` in the netns named by `netns_file` and the cgroup `cgroup_dir`.
    pub(super) fn spawn(
        mut cmd: Command,
        place: String,
        netns_file: &Path,
        cgroup_dir: &Path,
    ) -> io::Result<Self> {
        let netns = File::open(netns_file).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("opening netns {}: {err}", netns_file.display()),
            )
        })?;
        let procs = OpenOptions::new()
            .write(true)
            .open(cgroup_dir.join("cgroup.procs"))
            .map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("opening cgroup {}: {err}", cgroup_dir.display()),
                )
            })?;
        os::enter_before_exec(&mut cmd, procs.as_fd(), netns.as_fd());
        let child = cmd.spawn().map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("starting {:?} in {place}: {err}", cmd.get_program()),
            )
        })?;
        // `netns` and `procs` are closed only now, after the child has used them.
        drop((netns, procs));
        Ok(Self { child, place })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the process runs (`n0-p1` or `n0`).
    pub fn place(&self) -> &str {
        &self.place
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Lets the process outlive this handle (a lab left up by `lacewing lab
    /// up`); the lab's teardown still ends it, through its cgroup.
    pub fn detach(self) -> u32 {
        let pid = self.pid();
        std::mem::forget(self);
        pid
    }

    /// Sends `signal` (a `libc::SIG*`).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        os::kill(self.pid(), signal)
    }

    /// Exit status if the process has ended.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// SIGTERM, then waits up to `grace` for a clean exit before SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child.kill()?;
        self.child.wait()
    }

    /// Waits for the process to end and collects its piped output.
    pub fn wait_with_output(mut self) -> io::Result<Output> {
        use std::io::Read as _;
        // stderr on its own thread so a full stdout pipe cannot deadlock us.
        let stderr = self.child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        });
        let mut stdout = Vec::new();
        if let Some(mut pipe) = self.child.stdout.take() {
            pipe.read_to_end(&mut stdout)?;
        }
        let stderr = stderr
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        let status = self.child.wait()?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Waits until the process listens on TCP `port` (read from its own
    /// namespace's /proc/<pid>/net/tcp{,6}, no extra process needed).
    pub fn wait_listening(&mut self, port: u16, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "process {} in {} exited ({status}) before listening on port {port}",
                    self.pid(),
                    self.place
                )));
            }
            if listening_in_netns_of(self.pid(), port)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nothing listens on port {port} in {} after {timeout:?}",
                        self.place
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether any socket in the netns of `pid` listens on TCP `port`.
pub fn listening_in_netns_of(pid: u32, port: u16) -> io::Result<bool> {
    for table in ["tcp", "tcp6"] {
        let text = match fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        if tcp_table_has_listener(&text, port) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `/proc/net/tcp` rows: `sl local_address rem_address st ...`, where the local
/// address ends in `:PORT` (hex) and state `0A` is LISTEN.
fn tcp_table_has_listener(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|row| {
        let mut cols = row.split_whitespace();
        let local = cols.nth(1);
        let state = cols.nth(1);
        let local_port = local
            .and_then(|l| l.rsplit_once(':'))
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        local_port == Some(port) && state == Some("0A")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listeners_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n\
   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000\n";
        assert!(tcp_table_has_listener(table, 8080));
        assert!(
            !tcp_table_has_listener(table, 80),
            "port 80 is established, not listening"
        );
        assert!(!tcp_table_has_listener(table, 9090));
    }
}
