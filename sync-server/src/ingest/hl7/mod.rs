//! Hospital feeds: HL7 v2 ADT messages, over MLLP or from files.
//!
//! - [`adt`]: one message in, the patient's summary updated, one ACK out (AA, AE or AR).
//! - [`mllp`]: the MLLP listener (`0x0B` message `0x1C 0x0D`), one task per connection.
//! - [`time`]: HL7 times, with their offsets or in the feed's time zone.
//!
//! Parsing uses the `hl7-parser` crate; interpreting the segments is ours.

pub mod adt;
pub mod mllp;
pub mod time;
