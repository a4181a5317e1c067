//! A user stops watching while a pushed round is on its way: the device closes at once, before
//! it acknowledges the round. That is a normal end of a live session (the round stays pending
//! and the device's next `Hello` settles it), not a failed sync an operator's alert fires on.
//! Its own test binary: the server's metrics are process-wide.

use care_node::protocol::{ClientMessage, ServerMessage, close};
use care_sync_e2e::{TestDevice, TestServer, welcomed, within};
use care_sync_server::store::Role;

fn syncs(outcome: &'static str) -> i64 {
    care_sync_e2e::sync_outcomes(outcome) as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_a_watch_while_a_pushed_round_is_in_flight_is_a_normal_end() {
    let server = TestServer::start(2).await;
    let mut nurse = TestDevice::enrolled(&server, "nurse-stop", Role::CommunityNurse).await;
    let mut crew = TestDevice::enrolled(&server, "crew-stop", Role::AmbulanceCrew).await;
    server.caseload("nurse-stop", [0]);
    server.caseload("crew-stop", [0]);
    within(30, nurse.sync()).await.unwrap();
    within(30, crew.sync()).await.unwrap();
    let (ok, errors) = (syncs("ok"), syncs("error"));

    // A live session by hand: its first round acknowledged, then a pushed round not.
    let mut conn = welcomed(&nurse).await;
    conn.send(&ClientMessage::Watch).await.unwrap();
    conn.send(&ClientMessage::UploadDone).await.unwrap();
    let round = loop {
        match within(30, conn.recv()).await.unwrap() {
            Some(ServerMessage::RoundDone { round, .. }) => break round,
            Some(_) => {}
            None => panic!("the server ended the live session"),
        }
    };
    conn.send(&ClientMessage::RoundAck { round }).await.unwrap();
    crew.add_allergy(&server.patients[0], "Pushed while stopping");
    within(30, crew.sync()).await.unwrap();
    assert!(
        matches!(within(10, conn.recv()).await.unwrap(), Some(ServerMessage::Docs { .. })),
        "the change is pushed"
    );
    // The user stops watching now: the device leaves without acknowledging the pushed round.
    conn.quic().connection.close(close::DONE.into(), b"done");
    // Two sessions ended since the baseline: the crew's sync and this live session.
    for _ in 0..250 {
        if syncs("ok") + syncs("error") >= ok + errors + 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!((syncs("ok") - ok, syncs("error") - errors), (2, 0), "a normal end, not an error");

    // The round it did not acknowledge arrives at the next sync.
    within(30, nurse.sync()).await.expect("the next sync");
    assert_eq!(
        nurse.allergies(&server.patients[0]).iter().filter(|a| *a == "Pushed while stopping").count(),
        1
    );
}
