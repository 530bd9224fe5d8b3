//! A real PostgreSQL server for a test: Debian's `postgresql` (installed
//! by `scripts/test.sh`), a cluster of its own made with `initdb` in a
//! temporary directory, run as the `postgres` user on a free port, and
//! stopped (immediate) when dropped.
use std::path::PathBuf;
use std::process::Command;

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// The address it listens on.
    pub host: String,
    /// With TLS: the CA certificate (PEM) that signed the server's.
    pub ca: Option<PathBuf>,
    /// The network namespace it runs in (None: this one).
    netns: Option<String>,
}

/// Debian's server binaries (`/usr/lib/postgresql/<major>/bin`), newest.
fn bin_dir() -> PathBuf {
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|m| PathBuf::from(format!("/usr/lib/postgresql/{m}/bin/initdb")).exists())
        .collect();
    majors.sort();
    let m = majors.pop().unwrap_or_else(|| {
        panic!("no PostgreSQL server under /usr/lib/postgresql: apt-get install postgresql (scripts/test.sh does)")
    });
    PathBuf::from(format!("/usr/lib/postgresql/{m}/bin"))
}

/// `cmd` as the `postgres` user (initdb refuses root).
fn as_postgres(cmd: &std::path::Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(cmd);
    c
}

fn check(c: &mut Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    /// A new cluster listening on 127.0.0.1.
    pub fn start() -> Postgres {
        Self::start_on(&["127.0.0.1"])
    }

    /// A new cluster listening on each of `addrs` (addresses of this
    /// namespace); [`Postgres::url`] names the first.
    pub fn start_on(addrs: &[&str]) -> Postgres {
        Self::start_with(None, addrs, false)
    }

    /// A new cluster in namespace `hub`, listening on each of `addrs`
    /// (addresses of the hub).
    pub fn start_in(hub: &super::Hub, addrs: &[&str]) -> Postgres {
        Self::start_with(Some(&hub.name), addrs, false)
    }

    /// A new cluster on 127.0.0.1 that also speaks TLS, with a certificate
    /// for 127.0.0.1 signed by a CA of the test's own (`ca`), made with
    /// `openssl`.
    pub fn start_tls() -> Postgres {
        Self::start_with(None, &["127.0.0.1"], true)
    }

    fn start_with(netns: Option<&str>, addrs: &[&str], tls: bool) -> Postgres {
        let host = addrs[0];
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("dough-pg")
            .tempdir_in("/tmp")
            .unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        check(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path()),
            "chown the cluster's directory",
        );
        check(
            as_postgres(&bin.join("initdb"))
                .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
                .arg(&data),
            "initdb",
        );
        // Nodes in namespaces of their own (`LinkedNs`) come from 10.252/16.
        {
            use std::io::Write;
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .unwrap();
            writeln!(hba, "host all all 10.252.0.0/16 trust").unwrap();
        }
        let port = super::within_netns(netns, || {
            let l = std::net::TcpListener::bind((host, 0)).unwrap();
            l.local_addr().unwrap().port()
        });
        let mut ssl = String::new();
        let mut ca = None;
        if tls {
            let d = dir.path();
            let ssl_ = |args: &[&str], what: &str| {
                check(Command::new("openssl").current_dir(d).args(args), what)
            };
            let ec = [
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ];
            ssl_(
                &[
                    &["req", "-x509"][..],
                    &ec,
                    &[
                        "-keyout",
                        "ca.key",
                        "-out",
                        "ca.crt",
                        "-subj",
                        "/CN=dough-test-ca",
                        "-days",
                        "2",
                    ],
                ]
                .concat(),
                "make a CA",
            );
            ssl_(
                &[
                    &["req"][..],
                    &ec,
                    &[
                        "-keyout",
                        "server.key",
                        "-out",
                        "server.csr",
                        "-subj",
                        &format!("/CN={host}"),
                    ],
                ]
                .concat(),
                "make a server key",
            );
            std::fs::write(d.join("san.ext"), format!("subjectAltName=IP:{host}\n")).unwrap();
            ssl_(
                &[
                    "x509",
                    "-req",
                    "-in",
                    "server.csr",
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    "server.crt",
                    "-days",
                    "2",
                    "-extfile",
                    "san.ext",
                ],
                "sign the server's certificate",
            );
            check(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(d.join("server.key"))
                    .arg(d.join("server.crt")),
                "chown the server's key",
            );
            std::fs::set_permissions(
                d.join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
            ssl = format!(
                " -c ssl=on -c ssl_cert_file={0}/server.crt -c ssl_key_file={0}/server.key",
                d.display()
            );
            ca = Some(d.join("ca.crt"));
        }
        let mut start = as_postgres(&bin.join("pg_ctl"));
        if let Some(ns) = netns {
            super::enter_netns(&mut start, ns);
        }
        check(
            start
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.path().join("log"))
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses={} -c fsync=off -c max_connections=300{ssl}",
                    dir.path().display(),
                    addrs.join(",")
                ))
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start",
        );
        Postgres {
            dir,
            bin,
            port,
            host: host.into(),
            ca,
            netns: netns.map(String::from),
        }
    }

    /// The address of database `db`, made if it does not exist yet.
    pub fn url(&self, db: &str) -> String {
        self.url_via(db, &self.host.clone())
    }

    /// As [`Postgres::url`], reached through address `via`.
    pub fn url_via(&self, db: &str, via: &str) -> String {
        let exists = self.psql(
            "postgres",
            &format!("SELECT 1 FROM pg_database WHERE datname = '{db}'"),
        );
        if exists.trim().is_empty() {
            self.psql("postgres", &format!("CREATE DATABASE \"{db}\""));
        }
        format!("postgres://postgres@{via}:{}/{db}", self.port)
    }

    /// Run `sql` in database `db`; its rows, unaligned.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut psql = Command::new("psql");
        if let Some(ns) = &self.netns {
            super::enter_netns(&mut psql, ns);
        }
        let out = psql
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.host)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
