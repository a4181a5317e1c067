//! A hospital's ADT feed reaches the community nurse: admitted, then discharged (transfers and
//! cancellations are in `sync-server/tests/adt.rs`).

use care_sync_e2e::{TestDevice, TestServer, within};
use care_sync_server::store::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn adt(event: &str, control: &str, nhs: &str, ward: &str) -> Vec<u8> {
    let message = format!(
        "MSH|^~\\&|PAS|WGH|CARE|REGION|20261125143000||ADT^{event}|{control}|P|2.4\r\
         EVN|{event}|20261125143000\r\
         PID|1||{nhs}^^^NHS^NH||TESTER^EDITH||19300517|F\r\
         PV1|1|I|{ward}^^^Wessex General||||||||||||||||V7\r"
    );
    let mut frame = vec![0x0b];
    frame.extend_from_slice(message.as_bytes());
    frame.extend_from_slice(&[0x1c, 0x0d]);
    frame
}

async fn send(socket: &mut tokio::net::TcpStream, frame: &[u8]) -> String {
    socket.write_all(frame).await.unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(&[0x1c, 0x0d]) {
        socket.read_exact(&mut byte).await.unwrap();
        reply.push(byte[0]);
    }
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_nurse_learns_of_an_admission_and_a_discharge() {
    let server = TestServer::start(3).await;
    let mut nurse = TestDevice::enrolled(&server, "nurse-1", Role::CommunityNurse).await;
    server.caseload("nurse-1", [0]);
    within(30, nurse.sync()).await.unwrap();
    let nhs = server.patients[0].as_str().to_string();
    let mllp =
        care_sync_server::ingest::hl7::mllp::start(server.store.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
    let mut socket = tokio::net::TcpStream::connect(mllp.addr).await.unwrap();

    assert!(send(&mut socket, &adt("A01", "E1", &nhs, "Ward 7")).await.contains("MSA|AA|E1"));
    let report = within(30, nurse.sync()).await.unwrap();
    assert_eq!(report.stats.notifications, 1);
    let notes = nurse.store.notifications(10).unwrap();
    assert!(notes[0].text.starts_with("admitted to Ward 7, Wessex General"), "{:?}", notes[0].text);

    assert!(send(&mut socket, &adt("A03", "E2", &nhs, "Ward 7")).await.contains("MSA|AA|E2"));
    within(30, nurse.sync()).await.unwrap();
    let notes = nurse.store.notifications(10).unwrap();
    assert!(notes[0].text.starts_with("discharged from Ward 7, Wessex General"), "{:?}", notes[0].text);
    // A patient not on the nurse's caseload produces nothing on her device.
    let other = server.patients[2].as_str().to_string();
    assert!(send(&mut socket, &adt("A01", "E3", &other, "Ward 3")).await.contains("MSA|AA|E3"));
    let report = within(30, nurse.sync()).await.unwrap();
    assert_eq!(report.stats.notifications, 0);
    mllp.stop();
}
