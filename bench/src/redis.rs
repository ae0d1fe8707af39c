//! The Redis peer: a redis-server started on loopback for the run, and a
//! minimal RESP client (pipelined SET and GET) so that both sides of the
//! comparison move the same bytes with the same batching.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(bin: &str) -> Result<Server> {
        let port = super::free_port()?;
        let child = Command::new(bin)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--protected-mode", "yes", "--maxmemory", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("starting {bin} (install Debian's redis-server; bench/run does)")
            })?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let t = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            if t.elapsed() > Duration::from_secs(20) {
                bail!("redis-server did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Server { child, addr })
    }

    pub async fn flush(&self) -> Result<()> {
        let mut c = Conn::connect(self.addr).await?;
        c.w.write_all(b"*1\r\n$8\r\nFLUSHALL\r\n").await?;
        c.w.flush().await?;
        c.expect_ok().await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Conn {
            r: BufReader::with_capacity(1 << 20, r),
            w: BufWriter::with_capacity(1 << 16, w),
        })
    }

    async fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        self.r.read_line(&mut l).await?;
        Ok(l)
    }

    async fn expect_ok(&mut self) -> Result<()> {
        let l = self.line().await?;
        if l != "+OK\r\n" {
            bail!("redis answered {l:?}");
        }
        Ok(())
    }

    /// Pipelined SETs: all commands, then all replies.
    pub async fn set_batch(&mut self, kv: &[(String, &[u8])]) -> Result<()> {
        for (k, v) in kv {
            let head = format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n", k.len(), v.len());
            self.w.write_all(head.as_bytes()).await?;
            self.w.write_all(v).await?;
            self.w.write_all(b"\r\n").await?;
        }
        self.w.flush().await?;
        for _ in kv {
            self.expect_ok().await?;
        }
        Ok(())
    }

    /// Pipelined GETs into `bufs`; returns the bytes read.
    pub async fn get_batch(&mut self, keys: &[String], bufs: &mut [Vec<u8>]) -> Result<usize> {
        for k in keys {
            self.w
                .write_all(format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len()).as_bytes())
                .await?;
        }
        self.w.flush().await?;
        let mut total = 0;
        for (k, buf) in keys.iter().zip(bufs.iter_mut()) {
            let l = self.line().await?;
            let n: usize = l
                .strip_prefix('$')
                .and_then(|x| x.trim_end().parse().ok())
                .with_context(|| format!("GET {k}: redis answered {l:?}"))?;
            buf.resize(n, 0);
            self.r.read_exact(buf).await?;
            let mut crlf = [0u8; 2];
            self.r.read_exact(&mut crlf).await?;
            total += n;
        }
        Ok(total)
    }
}
