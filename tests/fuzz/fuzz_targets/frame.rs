//! Frames as the server and the device decode them: every message type a peer can send.
#![no_main]

use care_node::protocol::{ClientMessage, EnrolRequest, EnrolResponse, ServerMessage, decode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame::<ClientMessage>(data);
    let _ = decode_frame::<EnrolRequest>(data);
    let _ = decode_frame::<ServerMessage>(data);
    let _ = decode_frame::<EnrolResponse>(data);
});
