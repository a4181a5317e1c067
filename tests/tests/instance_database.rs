//! Issue 12: an instance that loses its database sends its devices to the region's other
//! instances, and serves again when the database is back. A test binary of its own: the
//! device's memory of which address answered is process-wide.
//!
//! Needs a PostgreSQL cluster with trust authentication (`CARE_SYNC_POSTGRES_URL`, as
//! `.ci/postgres` starts one); skipped without one unless `CARE_SYNC_REQUIRE_POSTGRES=1`.

use std::sync::Arc;

use care_sync_e2e::{enrolled_with_addrs, within};
use care_sync_server::demo::population::Population;
use care_sync_server::store::ServerStore;
use care_sync_server::store::postgres::PostgresStore;
use care_sync_server::store::postgres::scratch::ScratchDatabase;

/// One instance loses its database (its role may no longer log in; the other's may): a device
/// whose token names it first is told "unavailable, try again", never "revoked", and its next
/// sync goes to the other instance first and succeeds. When the database is back, the first
/// instance serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_cannot_reach_its_database_sends_devices_to_the_other() {
    use care_sync_server::store::postgres::scratch::execute;
    let Some(database) = ScratchDatabase::from_env() else {
        return eprintln!("skipped: no PostgreSQL cluster (CARE_SYNC_POSTGRES_URL)");
    };
    if database
        .url
        .split_once("://")
        .and_then(|(_, r)| r.split_once('@'))
        .is_some_and(|(user, _)| user.contains(':'))
    {
        return eprintln!(
            "skipped: the test's second role logs in without a password (a trust-authenticated cluster, as .ci/postgres starts)"
        );
    }
    let role = format!("care_a_{}", uuid::Uuid::new_v4().simple());
    execute(database.admin_url(), &format!("CREATE ROLE {role} LOGIN SUPERUSER")).unwrap();
    // Instance A connects as that role, instance B as the cluster's own user.
    let url_a = database.url.replacen("://", &format!("://{role}@"), 1);
    let url_a = match database.url.split_once("://").and_then(|(_, rest)| rest.split_once('@')) {
        Some((_, host)) => format!("postgres://{role}@{host}"),
        None => url_a,
    };
    let store_b: Arc<dyn ServerStore> = Arc::new(PostgresStore::open(&database.url).unwrap());
    let store_a: Arc<dyn ServerStore> = Arc::new(PostgresStore::open(&url_a).unwrap());
    let identity = store_b.server_identity().unwrap();
    let mut population = Population::new(21, care_sync_server::server_actor(&identity));
    let mut summaries: Vec<_> =
        (0..3).map(|_| population.next_patient(care_node::now_ms()).unwrap()).collect();
    let ids = store_b.insert_patients(&mut summaries).unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let a = care_sync_server::transport::start(store_a.clone(), any).await.unwrap();
    let b = care_sync_server::transport::start(store_b.clone(), any).await.unwrap();
    let addrs = format!("{},{}", a.addr, b.addr);
    let mut device = enrolled_with_addrs(store_b.as_ref(), "crew-db", &addrs).await;
    let id = store_b.device_by_name("crew-db").unwrap().unwrap().id;
    store_b.caseload_add_many(&ids.iter().map(|p| (id, *p)).collect::<Vec<_>>()).unwrap();
    // Through A while it has its database.
    within(30, device.sync()).await.expect("a sync through A");

    // A's role may no longer connect, and its connections are ended.
    // Two statements, two transactions: no connection can log in between them and stay.
    execute(database.admin_url(), &format!("ALTER ROLE {role} NOLOGIN")).unwrap();
    execute(
        database.admin_url(),
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"),
    )
    .unwrap();
    let refused = within(60, device.sync()).await.expect_err("A cannot serve without its database");
    assert!(
        matches!(refused, care_node::client::ClientError::ServerUnavailable(_)),
        "told to try again, not refused: {refused}"
    );
    let report = within(60, device.sync()).await.expect("the next sync goes to B");
    assert_eq!(report.stats.documents_in_scope, 3);
    assert_eq!(device.store.list().unwrap().len(), 3);

    // Back: A serves again (a device whose token names only A).
    execute(database.admin_url(), &format!("ALTER ROLE {role} LOGIN")).unwrap();
    let mut only_a = enrolled_with_addrs(store_b.as_ref(), "crew-a-only", &a.addr.to_string()).await;
    within(60, only_a.sync()).await.expect("A serves again once its database is back");
    a.shutdown().await;
    b.shutdown().await;
    drop((store_a, store_b));
    execute(database.admin_url(), &format!("DROP ROLE IF EXISTS {role}")).ok();
}
