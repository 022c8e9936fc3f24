//! A private OpenLDAP server (`slapd`, Debian package `slapd`) for tests, on 127.0.0.1.
//!
//! [`Slapd::start`] writes a `slapd.conf` (the core, cosine, inetorgperson and nis schemas; one
//! `mdb` database under `dc=example,dc=org`), loads the test's LDIF with `slapadd` before the
//! server starts, and runs `slapd -d 0` in the foreground on a free port, plain LDAP and, when
//! the test gives a certificate, LDAPS on a second port. The server stops when the value is
//! dropped; a detached watchdog stops it if the test process dies first.
//!
//! Access rules are a directory's usual ones: passwords can only be used to bind
//! (`by anonymous auth`), bound users read everything else, anonymous users read nothing.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The suffix of the test directory.
pub const SUFFIX: &str = "dc=example,dc=org";
/// The directory's administrator (`rootdn`), who may read and write everything.
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=org";

/// Why a test slapd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SlapdError {
    #[error("OpenLDAP's server is not installed ({0} missing). Install it with `./dev deps` (group ldap)")]
    Missing(String),
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A certificate and key (PEM) for the server's LDAPS port.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A running server; killed and deleted on drop.
#[derive(Debug)]
pub struct Slapd {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    tls_port: Option<u16>,
    admin_password: String,
}

const SLAPD: &str = "/usr/sbin/slapd";
const SLAPADD: &str = "/usr/sbin/slapadd";
const SLAPPASSWD: &str = "/usr/sbin/slappasswd";
const SCHEMAS: &str = "/etc/ldap/schema";

/// Whether the server binaries are installed (tests decide through [`crate::prerequisite`]).
pub fn installed() -> Result<(), SlapdError> {
    for tool in [SLAPD, SLAPADD, SLAPPASSWD] {
        if !Path::new(tool).exists() {
            return Err(SlapdError::Missing(tool.into()));
        }
    }
    if !Path::new(SCHEMAS).join("inetorgperson.schema").exists() {
        return Err(SlapdError::Missing(format!("{SCHEMAS}/inetorgperson.schema")));
    }
    Ok(())
}

/// `userPassword` for `password`, salted SHA-1 (`{SSHA}`, slapd's default scheme).
pub fn hash_password(password: &str) -> Result<String, SlapdError> {
    let out = Command::new(SLAPPASSWD).args(["-n", "-s", password]).output()?;
    if !out.status.success() {
        return Err(SlapdError::Command {
            command: "slappasswd".into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn free_port() -> Result<u16, SlapdError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

impl Slapd {
    /// Starts a server holding `ldif` (entries under [`SUFFIX`]; the suffix entry itself is
    /// made here). `tls` adds an LDAPS port with that certificate.
    pub fn start(ldif: &str, tls: Option<&ServerTls>) -> Result<Self, SlapdError> {
        installed()?;
        let dir = tempfile::Builder::new().prefix("pleiades-slapd-").tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        let admin_password = format!("admin-{}", std::process::id());
        let mut conf = format!(
            "include {SCHEMAS}/core.schema\ninclude {SCHEMAS}/cosine.schema\n\
             include {SCHEMAS}/inetorgperson.schema\ninclude {SCHEMAS}/nis.schema\n\
             modulepath /usr/lib/ldap\nmoduleload back_mdb\npidfile {}\n",
            path_str(&dir.path().join("slapd.pid"))
        );
        if let Some(tls) = tls {
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&cert, &tls.cert_pem)?;
            std::fs::write(&key, &tls.key_pem)?;
            conf += &format!(
                "TLSCertificateFile {}\nTLSCertificateKeyFile {}\n",
                path_str(&cert),
                path_str(&key)
            );
        }
        conf += &format!(
            "database mdb\nmaxsize 67108864\nsuffix \"{SUFFIX}\"\nrootdn \"{ADMIN_DN}\"\nrootpw {admin_password}\n\
             directory {}\n\
             access to attrs=userPassword by anonymous auth by * none\n\
             access to * by users read by * none\n",
            path_str(&data)
        );
        let conf_path = dir.path().join("slapd.conf");
        std::fs::write(&conf_path, conf)?;
        let root = format!(
            "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n"
        );
        let ldif_path = dir.path().join("data.ldif");
        std::fs::write(&ldif_path, root + ldif)?;
        let out = Command::new(SLAPADD).arg("-f").arg(&conf_path).arg("-l").arg(&ldif_path).output()?;
        if !out.status.success() {
            return Err(SlapdError::Command {
                command: "slapadd".into(),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let mut last = String::new();
        // A port picked free can be taken before the server binds it: try a few.
        for _ in 0..5 {
            let port = free_port()?;
            let tls_port = if tls.is_some() { Some(free_port()?) } else { None };
            let mut urls = format!("ldap://127.0.0.1:{port}/");
            if let Some(p) = tls_port {
                urls += &format!(" ldaps://127.0.0.1:{p}/");
            }
            let log = std::fs::File::create(dir.path().join("slapd.log"))?;
            let mut child = Command::new(SLAPD)
                .arg("-d")
                .arg("0")
                .arg("-f")
                .arg(&conf_path)
                .arg("-h")
                .arg(&urls)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            watchdog(child.id(), &conf_path)?;
            let deadline = Instant::now() + Duration::from_secs(20);
            let up = loop {
                if let Some(status) = child.try_wait()? {
                    last = format!(
                        "slapd exited ({status}): {}",
                        std::fs::read_to_string(dir.path().join("slapd.log")).unwrap_or_default()
                    );
                    break false;
                }
                let ports = [Some(port), tls_port];
                if ports.iter().flatten().all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok()) {
                    break true;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = "slapd did not listen within 20 s".into();
                    break false;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if up {
                return Ok(Self { child, dir, port, tls_port, admin_password });
            }
        }
        Err(SlapdError::Command { command: "slapd".into(), detail: last })
    }

    /// `ldap://127.0.0.1:PORT` (plain; StartTLS works on it when the server has a certificate).
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// `ldaps://127.0.0.1:PORT`, when started with a certificate.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("ldaps://127.0.0.1:{p}"))
    }

    /// The administrator's (`rootdn`'s) password.
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    /// The server's working directory (configuration, data, log).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills `pid` when this process is gone (a killed test does not leave a server behind), if
/// it is still the slapd of `conf` (and not a process that reused the number).
fn watchdog(pid: u32, conf: &Path) -> Result<(), SlapdError> {
    let script = format!(
        "while kill -0 {} 2>/dev/null; do sleep 1; done; \
         grep -qF \"$1\" /proc/{pid}/cmdline 2>/dev/null && kill {pid}",
        std::process::id()
    );
    Command::new("sh")
        .args(["-c", &script, "pleiades-slapd-watchdog"])
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(())
}
