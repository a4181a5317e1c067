-- A feed message's control id is claimed before the message is applied and marked done after
-- (several instances may receive one retransmission at once). Rows from before are done.
ALTER TABLE hl7_messages ADD COLUMN done BOOLEAN NOT NULL DEFAULT true;
