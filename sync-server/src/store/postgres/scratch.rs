//! Throwaway databases in a PostgreSQL cluster, for tests and benchmarks: each gets a database
//! of its own, dropped when done.

use crate::store::StoreError;

/// The cluster the tests and benchmarks use: `CARE_SYNC_POSTGRES_URL` (a URL of its
/// administrative database, as `.ci/postgres` exports it; the user must be allowed to create
/// databases). `None` when it is not set, unless `CARE_SYNC_REQUIRE_POSTGRES=1`, which makes a
/// missing cluster a failure instead of a skip (CI sets it).
pub fn cluster_from_env() -> Option<String> {
    match std::env::var("CARE_SYNC_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CARE_SYNC_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
            panic!(
                "CARE_SYNC_REQUIRE_POSTGRES=1 but CARE_SYNC_POSTGRES_URL is not set (.ci/test starts a cluster)"
            )
        }
        _ => None,
    }
}

/// A database made for one test or benchmark run, dropped with this value unless the thread
/// is panicking (a failed test's database, `care_test_…`, stays for inspection).
pub struct ScratchDatabase {
    admin: String,
    name: String,
    /// The new database's URL.
    pub url: String,
}

impl ScratchDatabase {
    /// Creates an empty database in the cluster whose administrative database is at `admin`.
    pub fn create(admin: &str) -> Result<Self, StoreError> {
        let name = format!("care_test_{}", uuid::Uuid::new_v4().simple());
        execute(admin, &format!("CREATE DATABASE {name}"))?;
        let base = admin.split('?').next().unwrap_or(admin);
        let (cluster, _) = base
            .rsplit_once('/')
            .filter(|(c, _)| c.contains("://") && !c.ends_with('/'))
            .ok_or_else(|| StoreError::Backend("the cluster URL must name a database".into()))?;
        // The cluster URL's parameters (sslmode, sslrootcert…) apply to the new database too.
        let query = admin.split_once('?').map_or(String::new(), |(_, q)| format!("?{q}"));
        let url = format!("{cluster}/{name}{query}");
        Ok(Self { admin: admin.to_string(), name, url })
    }

    /// The URL of the cluster's administrative database this one was made from.
    pub fn admin_url(&self) -> &str {
        &self.admin
    }

    /// A database in the cluster of [`cluster_from_env`], or `None` without one.
    pub fn from_env() -> Option<Self> {
        let admin = cluster_from_env()?;
        Some(Self::create(&admin).expect("a database in the test cluster"))
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        if !std::thread::panicking()
            && let Err(e) =
                execute(&self.admin, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
        {
            eprintln!("could not drop the scratch database {}: {e}", self.name);
        }
    }
}

/// Runs statements on the database at `url`, on a connection and runtime of their own
/// (callable from any thread, inside async code or not).
pub fn execute(url: &str, sql: &str) -> Result<(), StoreError> {
    let (url, sql) = (url.to_string(), sql.to_string());
    let work = move || -> Result<(), StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let super::tls::Connect { config, tls } = super::tls::Connect::parse(&url)?;
            match tls {
                super::tls::Tls::Off(none) => run_on(config.connect(none).await?, &sql).await?,
                super::tls::Tls::Verified(rustls) => run_on(config.connect(rustls).await?, &sql).await?,
            }
            Ok(())
        })
    };
    std::thread::spawn(work)
        .join()
        .map_err(|_| StoreError::Backend("the admin connection panicked".into()))?
}

/// Runs `sql` on a connection just made, then closes it.
async fn run_on<S, T>(
    (client, connection): (tokio_postgres::Client, tokio_postgres::Connection<S, T>),
    sql: &str,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
{
    let connection = tokio::spawn(connection);
    let done = client.batch_execute(sql).await;
    drop(client);
    let _ = connection.await;
    done
}
